//! Admission: the FIFO queue of pending tasks and the global forks budget, as plain data.
//!
//! A task costs its forks; the sum over running tasks never exceeds the budget. Pending tasks
//! start strictly in arrival (id) order: a large task at the head is not overtaken by smaller ones
//! behind it, so nothing starves. A task that asks for more than the whole budget (the operator
//! lowered `max_forks` and restarted) is charged the whole budget instead of waiting for ever.
//! The supervisor actor owns one `Admission` and calls it from its handlers, one at a time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the queue needs to know of a task.
pub trait Queued {
    /// Its id: arrival order.
    fn id(&self) -> i64;
    /// The forks it asks for.
    fn forks(&self) -> u32;
}

/// A pending task's place, for `/api/check`: its position (1 = next to start) when it is in this
/// agent's queue, and in words what it waits for. A pending task always has `waiting_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlace {
    pub position: Option<usize>,
    pub waiting_for: String,
}

/// The queue and the budget.
#[derive(Debug)]
pub struct Admission<T> {
    queue: VecDeque<T>,
    used: u32,
    max: u32,
}

impl<T: Queued> Admission<T> {
    /// An empty queue with `max` forks, all free.
    pub fn new(max: u32) -> Admission<T> {
        Admission {
            queue: VecDeque::new(),
            used: 0,
            max,
        }
    }

    /// Forks in use.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// The budget.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Forks free now.
    pub fn free(&self) -> u32 {
        self.max.saturating_sub(self.used)
    }

    /// What a task asking for `forks` is charged: no more than the whole budget.
    pub fn cost(&self, forks: u32) -> u32 {
        forks.min(self.max)
    }

    /// Tasks queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The ids of the queued tasks, in queue order.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.queue.iter().map(|t| t.id())
    }

    /// The queued task with this id.
    pub fn get(&self, id: i64) -> Option<&T> {
        self.queue.iter().find(|t| t.id() == id)
    }

    /// Queues a task in id (arrival) order, even if two inserts answered out of order.
    pub fn push(&mut self, task: T) {
        let at = self.queue.partition_point(|t| t.id() < task.id());
        self.queue.insert(at, task);
    }

    /// Takes the head of the queue if its cost fits in the free forks, and charges it.
    pub fn admit_head(&mut self) -> Option<T> {
        let cost = self.cost(self.queue.front()?.forks());
        if cost > self.free() {
            return None;
        }
        let task = self.queue.pop_front()?;
        self.used += cost;
        Some(task)
    }

    /// Charges forks taken outside the queue (a task claimed from the shared queue, or adopted
    /// after a restart with the forks it started with).
    pub fn charge(&mut self, forks: u32) {
        self.used = self.used.saturating_add(forks);
    }

    /// Gives back the forks of a task that ended.
    pub fn release(&mut self, forks: u32) {
        self.used = self.used.saturating_sub(forks);
    }

    /// Takes a queued task out (it was stopped while pending).
    pub fn remove(&mut self, id: i64) -> Option<T> {
        let at = self.queue.iter().position(|t| t.id() == id)?;
        self.queue.remove(at)
    }

    /// Where a queued task stands and what it waits for; `None` if it is not queued.
    pub fn place(&self, id: i64) -> Option<QueuePlace> {
        let ahead = self.queue.iter().position(|t| t.id() == id)?;
        let needs = self.cost(self.queue[ahead].forks());
        let forks = if needs == 1 { "fork" } else { "forks" };
        let before = match ahead {
            0 => "first in the queue".to_owned(),
            1 => "1 task ahead".to_owned(),
            n => format!("{n} tasks ahead"),
        };
        Some(QueuePlace {
            position: Some(ahead + 1),
            waiting_for: format!(
                "needs {needs} {forks}, {} of {} free; {before}",
                self.free(),
                self.max
            ),
        })
    }
}

/// Places in the pending queue. A handler takes one before it stores a task and the supervisor
/// gives it back when the task leaves the queue, so a full queue refuses a task before anything
/// is stored.
#[derive(Debug)]
pub struct QueueSlots {
    used: AtomicUsize,
    max: usize,
}

impl QueueSlots {
    /// `max` places, all free.
    pub fn new(max: usize) -> Arc<QueueSlots> {
        Arc::new(QueueSlots {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes a place; false if the queue is full.
    pub fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                (u < self.max).then_some(u + 1)
            })
            .is_ok()
    }

    /// Gives a place back (never below zero).
    pub fn give_back(&self) {
        // The closure always answers Some: the update cannot fail.
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(1))
            })
            .ok();
    }

    /// Takes a place even if the queue is full (a task queued again after a restart).
    pub fn force_take(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct T(i64, u32);

    impl Queued for T {
        fn id(&self) -> i64 {
            self.0
        }
        fn forks(&self) -> u32 {
            self.1
        }
    }

    fn drain(a: &mut Admission<T>) -> Vec<i64> {
        std::iter::from_fn(|| a.admit_head()).map(|t| t.0).collect()
    }

    #[test]
    fn starts_in_arrival_order_within_the_budget() {
        let mut a = Admission::new(10);
        a.push(T(3, 4));
        a.push(T(1, 4));
        a.push(T(2, 4));
        assert_eq!(drain(&mut a), vec![1, 2], "the third does not fit");
        assert_eq!((a.used(), a.free()), (8, 2));
        a.release(4);
        assert_eq!(drain(&mut a), vec![3]);
        assert_eq!(a.used(), 8);
        assert!(a.is_empty());
    }

    #[test]
    fn a_large_head_is_not_overtaken() {
        let mut a = Admission::new(10);
        a.push(T(1, 6));
        a.push(T(2, 6));
        a.push(T(3, 1));
        assert_eq!(drain(&mut a), vec![1]);
        // 4 forks free: task 3 would fit, but task 2 is ahead of it.
        assert_eq!(a.free(), 4);
        assert_eq!(a.admit_head(), None);
        a.release(6);
        assert_eq!(drain(&mut a), vec![2, 3]);
    }

    #[test]
    fn more_than_the_budget_costs_the_budget() {
        let mut a = Admission::new(5);
        a.push(T(1, 50));
        a.push(T(2, 1));
        assert_eq!(drain(&mut a), vec![1]);
        assert_eq!(a.used(), 5);
        a.release(a.cost(50));
        assert_eq!(drain(&mut a), vec![2]);
    }

    #[test]
    fn outside_charges_count_and_release_never_underflows() {
        let mut a = Admission::new(4);
        a.charge(3);
        a.push(T(1, 2));
        assert_eq!(a.admit_head(), None);
        a.release(3);
        assert_eq!(drain(&mut a), vec![1]);
        a.release(100);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn removing_and_places() {
        let mut a = Admission::new(4);
        a.charge(4);
        for id in 1..=3 {
            a.push(T(id, 1));
        }
        let waiting = |a: &Admission<T>, id| a.place(id).map(|p| (p.position, p.waiting_for));
        assert_eq!(
            waiting(&a, 1),
            Some((
                Some(1),
                "needs 1 fork, 0 of 4 free; first in the queue".into()
            ))
        );
        assert_eq!(
            waiting(&a, 3),
            Some((Some(3), "needs 1 fork, 0 of 4 free; 2 tasks ahead".into()))
        );
        assert_eq!(a.remove(2), Some(T(2, 1)));
        assert_eq!(a.remove(2), None);
        assert_eq!(waiting(&a, 3).and_then(|p| p.0), Some(2));
        assert_eq!(a.place(2), None);
        assert!(a.get(1).is_some() && a.get(2).is_none());
    }

    #[test]
    fn slots_refuse_when_full_and_never_go_below_zero() {
        let s = QueueSlots::new(2);
        assert!(s.take() && s.take());
        assert!(!s.take());
        s.give_back();
        assert!(s.take());
        s.give_back();
        s.give_back();
        s.give_back();
        assert!(s.take() && s.take() && !s.take());
        s.force_take();
        s.give_back();
        assert!(!s.take());
    }
}
