//! Threads for the calls the supervisor cannot answer at once (a blocking connect): kept
//! after their job for the next one — starting a thread costs more than a loopback
//! connect — and ended after a while without work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// How long a thread waits for another job before it ends.
const IDLE: Duration = Duration::from_secs(30);

pub struct Workers {
    jobs: Sender<Job>,
    queue: Arc<Mutex<Receiver<Job>>>,
    /// Threads waiting for a job, less the jobs already promised to them.
    idle: Arc<AtomicUsize>,
}

impl Workers {
    pub fn new() -> Workers {
        let (jobs, queue) = channel();
        Workers { jobs, queue: Arc::new(Mutex::new(queue)), idle: Arc::new(AtomicUsize::new(0)) }
    }

    /// Runs `job` on a waiting thread, else on a new one; `Err` gives it back when no
    /// thread can be started.
    pub fn run(&self, job: Job) -> Result<(), Job> {
        if take_one(&self.idle) {
            // a waiting thread is promised this job: it takes it (or another the same)
            return self.jobs.send(job).map_err(|e| e.0);
        }
        let (queue, idle) = (self.queue.clone(), self.idle.clone());
        let slot = Arc::new(Mutex::new(Some(job)));
        let first = slot.clone();
        let spawned = std::thread::Builder::new().name("styxy-connect".into()).spawn(move || {
            if let Some(job) = first.lock().ok().and_then(|mut j| j.take()) {
                job();
            }
            serve(&queue, &idle);
        });
        match spawned {
            Ok(_) => Ok(()),
            Err(_) => Err(slot.lock().ok().and_then(|mut j| j.take()).expect("the thread never ran")),
        }
    }
}

/// One fewer waiting thread, when there is one.
fn take_one(idle: &AtomicUsize) -> bool {
    idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
}

/// A thread's life after its first job: waits for the next, ends after `IDLE` without one
/// (unless a job was promised to it meanwhile).
fn serve(queue: &Mutex<Receiver<Job>>, idle: &AtomicUsize) {
    loop {
        idle.fetch_add(1, Ordering::AcqRel);
        loop {
            let next = match queue.lock() {
                Ok(q) => q.recv_timeout(IDLE),
                Err(_) => return,
            };
            match next {
                Ok(job) => {
                    job();
                    break;
                }
                Err(RecvTimeoutError::Timeout) if take_one(idle) => return,
                Err(RecvTimeoutError::Timeout) => {} // a job is on its way
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_and_threads_are_reused() {
        let w = Workers::new();
        let (tx, rx) = channel();
        for i in 0..20 {
            let tx = tx.clone();
            assert!(w.run(Box::new(move || tx.send((i, std::thread::current().id())).unwrap())).is_ok());
            // one at a time: the thread of the first job serves every later one
            let (n, _) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(n, i);
            while w.idle.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
        }
        let threads: std::collections::HashSet<_> = (0..3)
            .map(|_| {
                let tx = tx.clone();
                w.run(Box::new(move || tx.send((0, std::thread::current().id())).unwrap())).ok();
                rx.recv_timeout(Duration::from_secs(5)).unwrap().1
            })
            .collect();
        assert_eq!(threads.len(), 1, "one thread served them all");
    }
}
