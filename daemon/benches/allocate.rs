//! Grant+release round trips against a running built-in daemon, a fresh connection per
//! request as the hooks make them: `http` (default) over its HTTP socket (`POST
//! /allocate`, `DELETE /allocate/<lock>`: the hooks' logic, the CLI), or `hook` over the
//! shim's `hook.sock` beside it (`KEEP`, the answer, `DONE` with a failed bind, which
//! withdraws the grant: the cold path's one round trip, docs/ARCHITECTURE.md "Hook ↔
//! daemon protocol").
//!
//! `cargo bench -p styxy-preload-daemon --bench allocate -- SOCKET CLIENTS SECONDS [http|hook]`
//! prints one JSON line: clients, round trips per second, grant p50/p99 in µs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use styxy_preload_common::api::{AllocateReply, AllocateRequest};
use styxy_preload_common::hookproto::{self, Answer, Ask, DONE, GRANTED, KEEP};
use styxy_preload_common::http::{self, Endpoint, Timeouts};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (socket, clients, secs, hook) = match &args[..] {
        [s, c, t] => (s, c, t, false),
        [s, c, t, m] if m == "http" || m == "hook" => (s, c, t, m == "hook"),
        _ => {
            eprintln!("usage: allocate SOCKET CLIENTS SECONDS [http|hook]");
            std::process::exit(2);
        }
    };
    let ep = Endpoint::Unix(PathBuf::from(socket));
    let clients: usize = clients.parse().expect("CLIENTS");
    let run_for = Duration::from_secs_f64(secs.parse().expect("SECONDS"));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let ep = ep.clone();
            let hook_sock = PathBuf::from(socket).with_file_name(hookproto::SOCKET);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                if hook {
                    // ports of the api type no tool asks for by default, four per client: the
                    // shim does not wait for a withdrawal, and the next ask may come first
                    let mut k = 0;
                    while start.elapsed() < run_for {
                        let port = 8050 + 4 * i as u16 + k % 4;
                        k += 1;
                        lat.push(keep_and_withdraw(&hook_sock, port, format!("bench-{i}").as_bytes()));
                    }
                    return lat;
                }
                let req = AllocateRequest {
                    service_type: "api".into(),
                    service_name: Some("bench".into()),
                    instance_id: Some(format!("bench-{i}")),
                    ..Default::default()
                };
                let body = serde_json::to_vec(&req).expect("a request");
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    let r = http::call(&ep, "POST", "/allocate", Some(&body), Timeouts::CLI).expect("allocate");
                    lat.push(t.elapsed());
                    let reply: AllocateReply = r.json().expect("an allocate reply");
                    let lock = reply.lock_id.unwrap_or_else(|| panic!("no lock id: {}", String::from_utf8_lossy(&r.body)));
                    http::call(&ep, "DELETE", &format!("/allocate/{lock}"), None, Timeouts::CLI).expect("release");
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0);
    println!(
        r#"{{"clients":{clients},"round_trips_per_s":{:.0},"allocate_p50_us":{:.1},"allocate_p99_us":{:.1},"n":{}}}"#,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        lat.len()
    );
}

/// One exchange on `hook.sock`, as the shim makes it for a bind on a process's main
/// thread (which names the process: the daemon reads no `/proc` before it answers) that
/// then fails: `KEEP`,
/// the grant (looked for without sleeping for up to [`SPIN`], as the shim does, then
/// waited for), `DONE` with `EADDRINUSE` (the daemon withdraws the grant and logs why),
/// sent without a wait, and the close. The time from `KEEP` to the answer.
/// How long the shim looks for an answer without sleeping (preload/shim/daemon.rs).
const SPIN: Duration = Duration::from_micros(200);

fn keep_and_withdraw(path: &std::path::Path, port: u16, session: &[u8]) -> Duration {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket calls on an fd this function owns and closes; every buffer is
    // a local of the size passed.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut sun: libc::sockaddr_un = std::mem::zeroed();
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(libc::connect(fd, (&sun as *const libc::sockaddr_un).cast(), len), 0, "connect {}", path.display());
        let ask = Ask { kind: KEEP, port, family: 4, errno: 0, flags: 0, origin: 0, session, note: 0, comm: b"allocate" };
        let t = Instant::now();
        let wire = ask.encode().expect("a short session");
        assert_eq!(libc::send(fd, wire.as_ptr().cast(), wire.len(), 0), wire.len() as isize);
        let mut buf = [0u8; hookproto::ANSWER_LEN + 1];
        let spun = Instant::now();
        while spun.elapsed() < SPIN {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            if libc::poll(&mut p, 1, 0) == 1 {
                break;
            }
            libc::sched_yield();
        }
        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
        let took = t.elapsed();
        let answer = Answer::decode(&buf[..n.max(0) as usize]).expect("an answer");
        assert_eq!((answer.status, answer.port), (GRANTED, port), "port {port} not granted: is it free?");
        let done = Ask { kind: DONE, errno: libc::EADDRINUSE, ..ask }.encode().expect("a short session");
        assert_eq!(libc::send(fd, done.as_ptr().cast(), done.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL), done.len() as isize);
        libc::close(fd);
        took
    }
}
