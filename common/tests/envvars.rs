//! The environment contract has one home, `envvars::ALL`: README's table names the same
//! variables, and no Rust source names a `STYXY_*` variable in a string literal that the
//! list lacks. Reads the repository's files; no process is started.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use styxy_preload_common::envvars::ALL;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn listed() -> BTreeSet<String> {
    ALL.iter().map(|v| v.name.to_string()).collect()
}

/// The `STYXY_[A-Z0-9_]+` words of `text`.
fn names(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("STYXY_") {
        let word = &rest[at..];
        let len = word.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(word.len());
        if len > "STYXY_".len() {
            found.push(word[..len].to_string());
        }
        rest = &word[len..];
    }
    found
}

/// README's rule: a row of the table whose first cell starts with a `STYXY_` name
/// documents every `STYXY_*` name in that cell (`` `A`, `B` ``, `` `A=1` ``).
fn readme_rows() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let cells = readme.lines().filter_map(|l| l.strip_prefix("| `STYXY_").map(|_| l.split('|').nth(1).unwrap_or("")));
    cells.flat_map(names).collect()
}

#[test]
fn readme_table_names_the_listed_variables() {
    let (readme, list) = (readme_rows(), listed());
    let missing: Vec<_> = list.difference(&readme).collect();
    let extra: Vec<_> = readme.difference(&list).collect();
    assert!(missing.is_empty() && extra.is_empty(), "README's table lacks {missing:?}; envvars::ALL lacks {extra:?}");
}

#[test]
fn names_are_unique_and_described() {
    assert_eq!(listed().len(), ALL.len(), "a name listed twice");
    for v in ALL {
        assert!(v.name.starts_with("STYXY_") && !v.meaning.is_empty() && !v.read_by.is_empty(), "{v:?}");
    }
}

/// The string literals of a Rust file (doc comments are not literals: `#[doc = …]` skipped).
fn literals(tokens: TokenStream, out: &mut Vec<String>) {
    for t in tokens {
        match t {
            TokenTree::Group(g) => {
                let is_doc =
                    g.delimiter() == Delimiter::Bracket && matches!(g.stream().into_iter().next(), Some(TokenTree::Ident(i)) if i == "doc");
                if !is_doc {
                    literals(g.stream(), out);
                }
            }
            TokenTree::Literal(l) => out.push(l.to_string()),
            _ => {}
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_variable_a_source_names_is_listed() {
    let mut files = Vec::new();
    for dir in ["common", "daemon", "preload", "src"] {
        rust_files(&repo().join(dir), &mut files);
    }
    assert!(files.iter().any(|f| f.ends_with("preload/shim/lib.rs")), "the shim is scanned too");
    let list = listed();
    let mut unlisted = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let tokens: TokenStream = text.parse().unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        let mut lits = Vec::new();
        literals(tokens, &mut lits);
        for name in lits.iter().flat_map(|l| names(l)) {
            // a prefix (`b"STYXY_PRELOAD_"`) stands for the listed names it starts
            let known = if name.ends_with('_') { list.iter().any(|n| n.starts_with(&name)) } else { list.contains(&name) };
            if !known {
                unlisted.insert(format!("{name} ({})", file.strip_prefix(repo()).unwrap_or(file).display()));
            }
        }
    }
    assert!(unlisted.is_empty(), "named in a string literal but not in envvars::ALL (nor, then, README): {unlisted:?}");
}
