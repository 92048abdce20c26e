//! The daemon's liveness beat in the port map's header (docs/ARCHITECTURE.md "A busy
//! daemon and a stopped one"): hooks wait for a daemon that beats, however slowly it
//! answers, and go as asked once it stops beating.
//!
//! A thread of its own stores the beat every [`mapview::BEAT_EVERY_MS`]: on a starved
//! machine it wakes before the runtime thread, which may have a queue of connections to
//! serve first. It beats only while the runtime thread turns ([`Beat::turned`], from the
//! runtime's own tick): a runtime stuck for [`HUNG_MS`] is hung, and hooks stop waiting.
//! A stopped daemon (`SIGSTOP`) stops both.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use styxy_preload_common::mapview;
use styxy_preload_common::portmap::{monotonic_ms, PortMap};

/// A runtime that has not turned for this long is hung, not busy.
pub const HUNG_MS: u64 = 3000;

pub struct Beat {
    map: Arc<PortMap>,
    turned: AtomicU64,
    stop: AtomicBool,
}

impl Beat {
    /// Beats now, and every [`mapview::BEAT_EVERY_MS`] from a thread of its own.
    pub fn start(map: Arc<PortMap>) -> std::io::Result<Arc<Beat>> {
        let beat = Arc::new(Beat { map, turned: AtomicU64::new(monotonic_ms()), stop: AtomicBool::new(false) });
        beat.map.set_daemon_pid(std::process::id());
        beat.map.beat();
        let b = beat.clone();
        std::thread::Builder::new().name("beat".into()).spawn(move || b.run())?;
        Ok(beat)
    }

    /// The runtime thread made progress now.
    pub fn turned(&self) {
        self.turned.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// No more beats: the daemon no longer answers.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn run(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let now = monotonic_ms();
            if now.saturating_sub(self.turned.load(Ordering::Relaxed)) <= HUNG_MS {
                self.map.beat();
            }
            if let Some(links) = self.map.block_links() {
                links.tidy(now);
            }
            std::thread::sleep(Duration::from_millis(mapview::BEAT_EVERY_MS));
        }
    }
}
