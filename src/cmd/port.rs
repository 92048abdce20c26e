//! `styxy-preload port [REQUESTED]`: allocate (or look up) a port and print it.

use styxy_preload_common::policy::Policy;

use crate::cli::PortArgs;
use crate::coordinator;

pub fn run(a: PortArgs) -> Result<i32, String> {
    let session = super::session_arg(a.session)?;
    let policy = Policy::from_env().0;
    let ty = match (&a.service_type, a.requested) {
        (Some(t), _) if policy.known(t) => t.clone(),
        (Some(t), _) => {
            return Err(format!(
                "unknown service type '{t}'; known: {}",
                policy.types.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        }
        (None, Some(p)) => policy.decide(p).service_type().unwrap_or("dev").to_string(),
        (None, None) => "dev".to_string(),
    };
    let requested = match a.requested {
        Some(0) => return Err("port 0 is not a port to coordinate".into()),
        Some(p) => p,
        None => policy.service_type(&ty).map(|t| t.preferred.first().copied().unwrap_or(t.range.0)).unwrap_or(3000),
    };
    let ep = coordinator::ensure()?;
    // The allocation lives as long as the shell (or agent) that asked, or while the port is served.
    // SAFETY: getppid cannot fail.
    let owner = unsafe { libc::getppid() } as u32;
    let (port, lock) = super::exec::allocate(&ep, session.as_deref().unwrap_or("default"), &ty, requested, owner)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"port": port, "requested_port": requested, "service_type": ty, "session": session, "lock_id": lock})
        );
    } else {
        println!("{port}");
    }
    Ok(0)
}
