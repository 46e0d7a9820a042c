//! Per-game lanes: a queue per game with work pending, drained by one task
//! at a time, so a game's commands run one after another in arrival order
//! while different games run concurrently. What runs on a lane is the
//! caller's: this only keeps the books.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

/// The open lanes, by game.
pub(super) struct Lanes<J> {
    senders: Mutex<HashMap<String, mpsc::UnboundedSender<J>>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            senders: Mutex::new(HashMap::new()),
        }
    }
}

/// One game's queue, held by the task that drains it.
pub(super) struct Lane<J> {
    key: String,
    rx: mpsc::UnboundedReceiver<J>,
}

impl<J> Lane<J> {
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl<J> Lanes<J> {
    /// Queues `job` on the lane of `key`. When that lane was idle, returns
    /// it: the caller starts a task draining it with [`next`](Self::next).
    pub fn submit(&self, key: &str, job: J) -> Option<Lane<J>> {
        let mut senders = self.senders.lock().expect("lanes lock");
        let job = match senders.get(key) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return None,
                // Its task just ended: open the lane again.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(job).ok();
        senders.insert(key.to_owned(), tx);
        Some(Lane {
            key: key.to_owned(),
            rx,
        })
    }

    /// The lane's next job if one is waiting, leaving the lane open either
    /// way: for a look ahead while its task still runs a job.
    pub fn try_next(&self, lane: &mut Lane<J>) -> Option<J> {
        lane.rx.try_recv().ok()
    }

    /// The lane's next job; `None` closes the lane (nothing is pending).
    pub fn next(&self, lane: &mut Lane<J>) -> Option<J> {
        if let Ok(job) = lane.rx.try_recv() {
            return Some(job);
        }
        // Check again under the lock, so a job submitted right now either
        // lands here or opens a new lane.
        let mut senders = self.senders.lock().expect("lanes lock");
        match lane.rx.try_recv() {
            Ok(job) => Some(job),
            Err(_) => {
                senders.remove(&lane.key);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_game_has_one_lane_at_a_time_drained_in_arrival_order() {
        let lanes = Lanes::default();
        let mut a = lanes.submit("a", 1).expect("a was idle: a new lane");
        assert!(lanes.submit("a", 2).is_none(), "a's lane is open");
        let mut b = lanes.submit("b", 10).expect("b has its own lane");
        assert_eq!(lanes.next(&mut a), Some(1));
        assert!(lanes.submit("a", 3).is_none(), "still open while draining");
        assert_eq!(lanes.next(&mut a), Some(2));
        assert_eq!(lanes.next(&mut a), Some(3));
        assert_eq!(lanes.next(&mut a), None, "drained: the lane closes");
        assert_eq!(lanes.next(&mut b), Some(10));
        let mut again = lanes.submit("a", 4).expect("a closed: a new lane");
        assert_eq!(lanes.next(&mut again), Some(4));
    }

    #[test]
    fn a_look_ahead_keeps_the_lane_open() {
        let lanes = Lanes::default();
        let mut a = lanes.submit("a", 1).expect("a was idle: a new lane");
        assert_eq!(lanes.next(&mut a), Some(1));
        assert_eq!(lanes.try_next(&mut a), None, "nothing waits");
        assert!(
            lanes.submit("a", 2).is_none(),
            "an empty look ahead left the lane open: no second lane for a"
        );
        assert_eq!(lanes.try_next(&mut a), Some(2));
        assert_eq!(lanes.next(&mut a), None, "drained: the lane closes");
    }
}
