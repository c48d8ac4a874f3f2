//! A watchdog on the collective calls of a multi-node step. A node that dies closes its
//! connections and the others' calls fail at once; a node that vanishes without closing them
//! (power loss, a cut network, a suspended process) leaves them waiting for ever. Each worker
//! notes when it starts waiting in a collective call; the thread that waits for the workers
//! stops the step when one has waited longer than `--peer-timeout`.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Since when each worker waits in a collective call, and in which.
pub struct Watch(Mutex<Vec<Option<(Instant, &'static str)>>>);

impl Watch {
    pub fn new(workers: usize) -> Self {
        Self(Mutex::new(vec![None; workers]))
    }

    /// Runs `call`, a collective call of worker `k` (`what` names it in messages), noting the wait.
    pub fn waiting<R>(&self, k: usize, what: &'static str, call: impl FnOnce() -> R) -> R {
        self.set(k, Some((Instant::now(), what)));
        let result = call();
        self.set(k, None);
        result
    }

    fn set(&self, k: usize, state: Option<(Instant, &'static str)>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[k] = state;
    }

    /// The first worker that has waited longer than `limit` in one call: its index, the call,
    /// and how long.
    pub fn overdue(&self, limit: Duration) -> Option<(usize, &'static str, Duration)> {
        let waits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        waits.iter().enumerate().find_map(|(k, w)| {
            let (since, what) = (*w)?;
            let waited = since.elapsed();
            (waited > limit).then_some((k, what, waited))
        })
    }

    /// Every worker's result from `results` (worker index, result), in worker order. With a
    /// `limit`, fails as `timed_out(worker, call, waited)` says once a worker has waited longer
    /// than that in one call; fails as `died(worker)` if a worker ends without a result.
    pub fn collect<T>(
        &self,
        results: Receiver<(usize, T)>,
        limit: Option<Duration>,
        timed_out: impl Fn(usize, &str, Duration) -> String,
        died: impl Fn(usize) -> String,
    ) -> Result<Vec<T>, String> {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut got: Vec<Option<T>> = (0..workers).map(|_| None).collect();
        // Often enough that a timeout is seen within a second of the limit.
        let poll = limit.map_or(Duration::MAX, |l| (l / 4).min(Duration::from_secs(1)));
        while got.iter().any(Option::is_none) {
            match results.recv_timeout(poll) {
                Ok((k, result)) => got[k] = Some(result),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((k, what, waited)) = limit.and_then(|l| self.overdue(l)) {
                        return Err(timed_out(k, what, waited));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let k = got
                        .iter()
                        .position(Option::is_none)
                        .expect("one is missing");
                    return Err(died(k));
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_worker_that_waits_too_long_fails_the_step_and_a_quick_one_does_not() {
        let watch = Arc::new(Watch::new(2));
        let (tx, rx) = std::sync::mpsc::channel();
        // Worker 0 answers at once; worker 1 waits in a call that never returns in time.
        tx.send((0, "zero")).unwrap();
        let (w, tx1) = (watch.clone(), tx.clone());
        std::thread::spawn(move || {
            w.waiting(1, "summing the gradients", || {
                std::thread::sleep(Duration::from_secs(5))
            });
            let _ = tx1.send((1, "one"));
        });
        let start = Instant::now();
        let limit = Duration::from_millis(200);
        let err = watch
            .collect(
                rx,
                Some(limit),
                |k, what, waited| format!("{k} {what} {}", waited >= limit),
                |k| format!("{k} died"),
            )
            .unwrap_err();
        assert_eq!(err, "1 summing the gradients true");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );

        // Calls that end in time: every result, in worker order.
        let watch = Watch::new(2);
        let (tx, rx) = std::sync::mpsc::channel();
        watch.waiting(1, "quick", || tx.send((1, "one")).unwrap());
        watch.waiting(0, "quick", || tx.send((0, "zero")).unwrap());
        assert_eq!(watch.overdue(Duration::ZERO), None);
        let got = watch.collect(
            rx,
            Some(limit),
            |_, _, _| unreachable!(),
            |k| format!("{k}"),
        );
        assert_eq!(got.unwrap(), ["zero", "one"]);

        // A worker that ends without a result.
        let watch = Watch::new(2);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send((0, "zero")).unwrap();
        drop(tx);
        let got = watch.collect(rx, None, |_, _, _| unreachable!(), |k| format!("{k} died"));
        assert_eq!(got.unwrap_err(), "1 died");
    }
}
