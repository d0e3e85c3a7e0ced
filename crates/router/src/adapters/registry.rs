//! The adapter scheduler's state, owned by the batching task (no locks): the base model's FIFO queue,
//! and per adapter its state and FIFO queue. The rules are plain functions of that state, with no I/O:
//! which adapters to load and offload ([`Registry::plan`]) and which queued requests may be prefilled
//! ([`Registry::prefill_candidates`], oldest first across the base queue and the active adapters).
//!
//! States of an adapter (key = source + id):
//!
//! ```text
//!      ┌──────────────slot free at its first request (one shard): loads as it downloads─────┐
//!      │                                                                                      ▼
//! Downloading ──ok──► Downloaded ──slot free──► Loading ──ok──► Active ──idle or cycled out──► Offloading
//!      │                  ▲                        │                                              │
//!      └──failed──► (errored: its queue fails, the entry is forgotten) ◄──failed──┘               │
//!                         └───────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! An adapter that takes a free slot as its download starts ([`Registry::claim_for_download`]) is Loading
//! from then on: its download also loads it (and if the shard had no slot after all, it becomes
//! Downloaded and waits for one as others do).
//!
//! Past [`KEPT_IDLE`] idle Downloaded adapters (nothing queued or running), the least recently used are
//! forgotten, as an errored one is (a later request downloads it again).
//!
//! Loading, Active and Offloading adapters hold a device slot; there are `max_active` slots. A load the
//! shard refuses for want of device memory ([`Registry::load_refused`]) makes the adapter wait as a
//! Downloaded one, and for [`ROOM_KEPT`] the adapters' bytes are kept within what the others held then:
//! idle adapters are offloaded to make room, as for a slot. A request
//! in the running batch holds an [`AdapterLease`]; an adapter with a live lease is never offloaded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::AdapterKey;

/// Where an adapter is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// DownloadAdapter is in flight.
    Downloading,
    /// The files are in the shards' host cache; it can be loaded when a slot is free.
    Downloaded,
    /// LoadAdapter is in flight (holds a slot).
    Loading,
    /// Usable by Prefill (holds a slot).
    Active {
        /// When it became active.
        since: Instant,
        /// Cycled out: it takes no new prefills so that it can be offloaded once its requests finish.
        draining: bool,
    },
    /// OffloadAdapter is in flight (still holds its slot).
    Offloading,
}

/// A shard call the batching task should start for an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Load it on every shard.
    Load(AdapterKey),
    /// Offload it from every shard.
    Offload(AdapterKey),
}

/// A running request's hold on its adapter; dropping it (the request finished, failed or was cancelled)
/// releases the hold.
#[derive(Debug)]
pub struct AdapterLease {
    _hold: Arc<()>,
}

/// A queued item with its arrival number (the order across queues).
#[derive(Debug)]
struct Queued<T> {
    seq: u64,
    item: T,
}

#[derive(Debug)]
struct Adapter<T> {
    state: State,
    queue: VecDeque<Queued<T>>,
    /// One clone per lease: `strong_count - 1` requests of the running batch use the adapter.
    users: Arc<()>,
    last_used: Instant,
    /// When the download (or, for a reload, the load) began; taken when it becomes active.
    readying_since: Option<Instant>,
    /// Whether a request was prefilled since it became active: only then may it be cycled out, so an
    /// adapter loaded for waiting requests serves them before it can lose its slot.
    served: bool,
    /// Arrival number of its last move to Downloaded: it waits for a slot from then or from its oldest
    /// queued request, whichever is later, so an adapter just cycled out queues behind those waiting.
    downloaded_at: u64,
    /// Loading by its download ([`Registry::claim_for_download`]), not by a LoadAdapter.
    loads_in_download: bool,
    /// Bytes of its weights, as its download answered (0 until then).
    bytes: u64,
    /// Its download, a load or its preload succeeded: the files were found, allowed and valid
    /// ([`Registry::mark_checked`]).
    checked: bool,
}

impl<T> Adapter<T> {
    fn new(state: State, now: Instant) -> Self {
        Self {
            state,
            queue: VecDeque::new(),
            users: Arc::new(()),
            last_used: now,
            readying_since: Some(now),
            served: false,
            downloaded_at: 0,
            loads_in_download: false,
            bytes: 0,
            checked: false,
        }
    }

    fn running(&self) -> usize {
        Arc::strong_count(&self.users) - 1
    }

    fn holds_slot(&self) -> bool {
        matches!(self.state, State::Loading | State::Active { .. } | State::Offloading)
    }

    fn prefillable(&self) -> bool {
        matches!(self.state, State::Active { draining: false, .. })
    }
}

/// Downloaded adapters with nothing queued that stay known: past this many, the least recently used are
/// forgotten (each an entry of the registry and the catalog, and a walk of `plan` and `publish`). A
/// later request for one downloads it again, which the shards answer from their caches.
const KEPT_IDLE: usize = 4096;

/// How long the room learned from a load refused for want of device memory bounds the adapters' bytes;
/// then loads may use every slot again (a refusal learns the room anew). The memory may have been short
/// for a moment (a large prompt's activations), and the adapters' sizes vary.
pub const ROOM_KEPT: Duration = Duration::from_secs(60);

/// Queues and adapter states; `T` is a queued request.
#[derive(Debug)]
pub struct Registry<T> {
    base: VecDeque<Queued<T>>,
    /// Ordered by key, so the catalog can be compared with it in place (no allocation per step).
    adapters: BTreeMap<AdapterKey, Adapter<T>>,
    next_seq: u64,
    max_active: usize,
    cycle_time: Duration,
    /// [`KEPT_IDLE`] (smaller in tests).
    kept_idle: usize,
    /// The adapters the device held when it last refused a load for want of memory (with their bytes as
    /// then known; 0: look it up, a download still in flight), and when: their bytes are the room.
    room: Option<(Vec<(AdapterKey, u64)>, Instant)>,
    /// The smallest adapter refused for want of memory with no other adapter on the device, and when:
    /// adapters at least that large are not loaded while it is kept ([`ROOM_KEPT`]), so a request for one
    /// cannot clear the device of every other adapter again.
    too_big: Option<(u64, Instant)>,
}

impl<T> Registry<T> {
    /// Empty queues; at most `max_active` adapters hold a device slot; an adapter active for
    /// `cycle_time` while others wait for a slot stops taking prefills.
    pub fn new(max_active: usize, cycle_time: Duration) -> Self {
        Self {
            base: VecDeque::new(),
            adapters: BTreeMap::new(),
            next_seq: 0,
            max_active,
            cycle_time,
            kept_idle: KEPT_IDLE,
            room: None,
            too_big: None,
        }
    }

    /// Records an adapter of `bytes` loaded before serving (`--preloaded-adapter-ids`).
    pub fn insert_active(&mut self, key: AdapterKey, bytes: u64, now: Instant) {
        let mut adapter = Adapter::new(
            State::Active {
                since: now,
                draining: false,
            },
            now,
        );
        adapter.readying_since = None;
        adapter.bytes = bytes;
        adapter.checked = true;
        self.adapters.insert(key, adapter);
    }

    /// Records the size of `key`'s weights (its download's answer).
    pub fn set_bytes(&mut self, key: &AdapterKey, bytes: u64) {
        if let Some(adapter) = self.adapters.get_mut(key) {
            adapter.bytes = bytes;
        }
    }

    /// Whether `key`'s download (or a load, or its preload) succeeded (it is forgotten when a download or
    /// load fails).
    pub fn checked(&self, key: &AdapterKey) -> bool {
        self.adapters.get(key).is_some_and(|a| a.checked)
    }

    /// Marks `key`'s download as succeeded; returns the items queued for it meanwhile.
    pub fn mark_checked(&mut self, key: &AdapterKey) -> impl Iterator<Item = &mut T> {
        let adapter = self.adapters.get_mut(key);
        let queue = adapter.map(|a| {
            a.checked = true;
            a.queue.iter_mut().map(|q| &mut q.item)
        });
        queue.into_iter().flatten()
    }

    /// The room learned from the last refused load, while it is kept ([`ROOM_KEPT`]).
    fn room(&self, now: Instant) -> Option<u64> {
        let (held, at) = self.room.as_ref()?;
        if now.saturating_duration_since(*at) >= ROOM_KEPT {
            return None;
        }
        Some(
            held.iter()
                .map(|(k, b)| match *b {
                    0 => self.adapters.get(k).map_or(0, |a| a.bytes),
                    b => b,
                })
                .sum(),
        )
    }

    /// `Some(limit)` when an adapter of `bytes` is at least as large as one refused for want of memory with
    /// nothing else on the device, within [`ROOM_KEPT`]: it would not fit either.
    pub fn never_fits(&self, bytes: u64, now: Instant) -> Option<u64> {
        self.too_big
            .filter(|&(limit, at)| bytes >= limit && now.saturating_duration_since(at) < ROOM_KEPT)
            .map(|(limit, _)| limit)
    }

    /// A load of `key` was refused for want of device memory: it waits as a Downloaded adapter (its
    /// requests stay queued, its slot is released), and the room is the bytes the other adapters on the
    /// device hold now. `false` when no other adapter holds device memory (no offload can make room: fail
    /// it).
    pub fn load_refused(&mut self, key: &AdapterKey, now: Instant) -> bool {
        if self.state(key) != Some(State::Loading) {
            return false;
        }
        let others: Vec<(AdapterKey, u64)> = self
            .adapters
            .iter()
            .filter(|(k, a)| *k != key && a.holds_slot())
            .map(|(k, a)| (k.clone(), a.bytes))
            .collect();
        if others.is_empty() {
            let bytes = self.adapters.get(key).map_or(0, |a| a.bytes);
            if bytes > 0 && self.never_fits(bytes, now).is_none() {
                self.too_big = Some((bytes, now));
            }
            return false;
        }
        self.room = Some((others, now));
        if let Some(a) = self.adapters.get_mut(key) {
            a.loads_in_download = false;
        }
        self.mark_downloaded(key, State::Loading)
    }

    /// Queues `item` for `adapter` (`None`: the base model). `true` when the adapter was unknown: it is
    /// now Downloading and the caller starts its one download.
    pub fn push(&mut self, adapter: Option<&AdapterKey>, item: T, now: Instant) -> bool {
        let queued = Queued {
            seq: self.next_seq,
            item,
        };
        self.next_seq += 1;
        let Some(key) = adapter else {
            self.base.push_back(queued);
            return false;
        };
        match self.adapters.get_mut(key) {
            Some(adapter) => {
                adapter.queue.push_back(queued);
                false
            }
            None => {
                let mut adapter = Adapter::new(State::Downloading, now);
                adapter.queue.push_back(queued);
                self.adapters.insert(key.clone(), adapter);
                true
            }
        }
    }

    /// Keeps only the queued items for which `keep` is true (drops cancelled requests).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.base.retain(|q| keep(&q.item));
        for adapter in self.adapters.values_mut() {
            adapter.queue.retain(|q| keep(&q.item));
        }
    }

    /// Items waiting in every queue.
    pub fn queued(&self) -> usize {
        self.base.len() + self.adapters.values().map(|a| a.queue.len()).sum::<usize>()
    }

    /// Adapters usable by Prefill now (Active, draining or not).
    pub fn active(&self) -> usize {
        self.adapters
            .values()
            .filter(|a| matches!(a.state, State::Active { .. }))
            .count()
    }

    /// Every known adapter with its state, queued requests and running users.
    /// In key order: (key, state name, queued, running).
    pub fn list(&self) -> impl ExactSizeIterator<Item = (&AdapterKey, &'static str, usize, usize)> + Clone {
        self.adapters.iter().map(|(key, a)| {
            (
                key,
                super::catalog::state_name(a.state),
                a.queue.len(),
                Arc::strong_count(&a.users) - 1,
            )
        })
    }

    /// The state of `key`, if known.
    pub fn state(&self, key: &AdapterKey) -> Option<State> {
        self.adapters.get(key).map(|a| a.state)
    }

    /// Whether any queued item could be prefilled now.
    pub fn has_prefill_candidates(&self) -> bool {
        self.prefill_candidates().next().is_some()
    }

    /// The items that may be prefilled now, oldest first: the base queue and the queues of the active
    /// adapters that are not draining, merged by arrival.
    pub fn prefill_candidates(&self) -> impl Iterator<Item = &T> {
        let mut queues: Vec<_> = self.prefillable_queues().map(|q| q.iter().peekable()).collect();
        std::iter::from_fn(move || {
            let (index, _) = queues
                .iter_mut()
                .enumerate()
                .filter_map(|(i, q)| Some((i, q.peek()?.seq)))
                .min_by_key(|&(_, seq)| seq)?;
            queues[index].next().map(|q| &q.item)
        })
    }

    /// The same items as [`Self::prefill_candidates`] in no particular order (no merge by arrival), for
    /// sums over them.
    pub fn prefillable_items(&self) -> impl Iterator<Item = &T> {
        self.prefillable_queues().flat_map(|q| q.iter().map(|q| &q.item))
    }

    fn prefillable_queues(&self) -> impl Iterator<Item = &VecDeque<Queued<T>>> {
        std::iter::once(&self.base).chain(self.adapters.values().filter(|a| a.prefillable()).map(|a| &a.queue))
    }

    /// Removes the first of [`Self::prefill_candidates`], with a lease on its adapter (none for the base
    /// model). The adapter counts as used now.
    pub fn pop_candidate(&mut self, now: Instant) -> Option<(T, Option<AdapterLease>)> {
        let base_seq = self.base.front().map(|q| q.seq);
        let adapter = self
            .adapters
            .values_mut()
            .filter(|a| a.prefillable())
            .filter_map(|a| Some((a.queue.front()?.seq, a)))
            .min_by_key(|(seq, _)| *seq);
        match (base_seq, adapter) {
            (Some(base), Some((seq, _))) if base < seq => self.base.pop_front().map(|q| (q.item, None)),
            (_, Some((_, adapter))) => {
                adapter.last_used = now;
                adapter.served = true;
                let lease = AdapterLease {
                    _hold: Arc::clone(&adapter.users),
                };
                adapter.queue.pop_front().map(|q| (q.item, Some(lease)))
            }
            (_, None) => self.base.pop_front().map(|q| (q.item, None)),
        }
    }

    /// Decides the adapter calls to start now and updates the states they lead to:
    ///
    /// 1. Downloaded adapters with queued requests get the free slots, in the order they started waiting
    ///    for one (the later of their download, or offload, and their oldest queued request), while their
    ///    bytes fit the room learned from a refused load, if any.
    /// 2. For those still waiting, idle active adapters (nothing running, nothing queued) are offloaded,
    ///    least recently used first.
    /// 3. If that is not enough, adapters active for at least the cycle time that have served a request
    ///    stop taking prefills (longest active first); each is offloaded once none of its requests is
    ///    running.
    pub fn plan(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut waiting: Vec<(u64, AdapterKey)> = self
            .adapters
            .iter()
            // (Adapters too large for the device wait out ROOM_KEPT rather than clear it.)
            .filter(|(_, a)| a.state == State::Downloaded && (a.bytes == 0 || self.never_fits(a.bytes, now).is_none()))
            .filter_map(|(key, a)| Some((a.queue.front()?.seq.max(a.downloaded_at), key.clone())))
            .collect();
        waiting.sort_unstable();
        let held = self.adapters.values().filter(|a| a.holds_slot()).count();
        let free = self.max_active.saturating_sub(held);
        // In waiting order, while slots are free and (after a refusal for want of memory) the bytes fit.
        let room = self.room(now);
        let mut held_bytes: u64 = self.adapters.values().filter(|a| a.holds_slot()).map(|a| a.bytes).sum();
        let mut started = 0;
        for (_, key) in waiting.iter().take(free) {
            let bytes = self.adapters.get(key).map_or(0, |a| a.bytes);
            // With nothing else on the device, it goes (a refusal then fails it).
            if held + started > 0 && room.is_some_and(|room| held_bytes + bytes > room) {
                break;
            }
            held_bytes += bytes;
            started += 1;
            self.set_loading(key, now);
            actions.push(Action::Load(key.clone()));
        }

        let mut offloading = 0;
        for adapter in self.adapters.values_mut() {
            match &mut adapter.state {
                State::Active { draining, .. } => *draining = false,
                State::Offloading => offloading += 1,
                _ => {}
            }
        }
        let mut needed = waiting.len().saturating_sub(started).saturating_sub(offloading);
        if needed == 0 {
            return actions;
        }

        let mut idle: Vec<(Instant, AdapterKey)> = self
            .adapters
            .iter()
            .filter(|(_, a)| matches!(a.state, State::Active { .. }) && a.running() == 0 && a.queue.is_empty())
            .map(|(key, a)| (a.last_used, key.clone()))
            .collect();
        idle.sort_unstable();
        for (_, key) in idle.into_iter().take(needed) {
            self.set_offloading(&key);
            actions.push(Action::Offload(key));
            needed -= 1;
        }

        let mut overdue: Vec<(Instant, AdapterKey)> = self
            .adapters
            .iter()
            .filter_map(|(key, a)| match a.state {
                State::Active { since, .. } if a.served && now.saturating_duration_since(since) >= self.cycle_time => {
                    Some((since, key.clone()))
                }
                _ => None,
            })
            .collect();
        overdue.sort_unstable();
        for (_, key) in overdue.into_iter().take(needed) {
            let Some(adapter) = self.adapters.get_mut(&key) else {
                continue;
            };
            if adapter.running() == 0 {
                adapter.state = State::Offloading;
                actions.push(Action::Offload(key));
            } else if let State::Active { draining, .. } = &mut adapter.state {
                *draining = true;
            }
        }
        actions
    }

    /// A Downloading adapter takes a free slot for its download to load it as well, when the free slots
    /// outnumber the Downloaded adapters waiting for one (no earlier waiter is passed over). `true`: it
    /// is Loading now, and its download should load it.
    pub fn claim_for_download(&mut self, key: &AdapterKey, now: Instant) -> bool {
        if self.room(now).is_some() || self.never_fits(u64::MAX, now).is_some() {
            // Device memory is short and this adapter's size is not known yet.
            return false;
        }
        let waiting = self
            .adapters
            .values()
            .filter(|a| a.state == State::Downloaded && !a.queue.is_empty())
            .count();
        let held = self.adapters.values().filter(|a| a.holds_slot()).count();
        if self.max_active.saturating_sub(held) <= waiting {
            return false;
        }
        match self.adapters.get_mut(key) {
            Some(adapter) if adapter.state == State::Downloading => {
                adapter.state = State::Loading;
                adapter.loads_in_download = true;
                true
            }
            _ => false,
        }
    }

    fn set_loading(&mut self, key: &AdapterKey, now: Instant) {
        if let Some(adapter) = self.adapters.get_mut(key) {
            adapter.state = State::Loading;
            adapter.readying_since.get_or_insert(now);
        }
    }

    fn set_offloading(&mut self, key: &AdapterKey) {
        if let Some(adapter) = self.adapters.get_mut(key) {
            adapter.state = State::Offloading;
        }
    }

    /// Downloading → Downloaded, or Loading → Downloaded for a download that was to load it but did not
    /// (the shard had no slot free; its slot here is released). `false` if `key` was not downloading.
    pub fn downloaded(&mut self, key: &AdapterKey) -> bool {
        match self.adapters.get_mut(key) {
            Some(a) if a.loads_in_download && a.state == State::Loading => {
                a.loads_in_download = false;
                self.mark_downloaded(key, State::Loading)
            }
            _ => self.mark_downloaded(key, State::Downloading),
        }
    }

    /// Loading → Active; returns the time since its download (or reload) began. `None` if `key` was not
    /// loading, or came back from [`Registry::suspend`] (no load began: nothing to time).
    pub fn loaded(&mut self, key: &AdapterKey, now: Instant) -> Option<Duration> {
        let adapter = self.adapters.get_mut(key).filter(|a| a.state == State::Loading)?;
        adapter.loads_in_download = false;
        adapter.state = State::Active {
            since: now,
            draining: false,
        };
        adapter.last_used = now;
        adapter.served = false;
        let began = adapter.readying_since.take()?;
        Some(now.saturating_duration_since(began))
    }

    /// Active → Loading, keeping its slot: its requests wait (a streamed load whose read may have failed,
    /// until its outcome comes: [`Registry::loaded`] or [`Registry::fail`]). `false` if `key` was not active.
    pub fn suspend(&mut self, key: &AdapterKey) -> bool {
        match self.adapters.get_mut(key) {
            Some(a) if matches!(a.state, State::Active { .. }) => {
                a.state = State::Loading;
                true
            }
            _ => false,
        }
    }

    /// Offloading → Downloaded (its queued requests, if any, wait for a slot again). `false` if `key`
    /// was not offloading.
    pub fn offloaded(&mut self, key: &AdapterKey) -> bool {
        self.mark_downloaded(key, State::Offloading)
    }

    /// `from` → Downloaded, stamped with the next arrival number.
    fn mark_downloaded(&mut self, key: &AdapterKey, from: State) -> bool {
        match self.adapters.get_mut(key) {
            Some(adapter) if adapter.state == from => {
                adapter.state = State::Downloaded;
                adapter.downloaded_at = self.next_seq;
                self.next_seq += 1;
                self.forget_idle();
                true
            }
            _ => false,
        }
    }

    /// Forgets the least recently used idle Downloaded adapters (nothing queued) past `kept_idle`.
    /// (The adapter just marked may be one of them, when cancellations emptied its queue.)
    fn forget_idle(&mut self) {
        let idle = |a: &Adapter<T>| a.state == State::Downloaded && a.queue.is_empty() && a.running() == 0;
        let count = self.adapters.values().filter(|a| idle(a)).count();
        let Some(excess) = count.checked_sub(self.kept_idle).filter(|&n| n > 0) else {
            return;
        };
        let mut idle: Vec<(Instant, AdapterKey)> = self
            .adapters
            .iter()
            .filter(|(_, a)| idle(a))
            .map(|(key, a)| (a.last_used, key.clone()))
            .collect();
        idle.sort_unstable();
        for (_, key) in idle.into_iter().take(excess) {
            self.adapters.remove(&key);
        }
    }

    /// A download or load failed: forgets the adapter (the next request for it downloads it again) and
    /// returns the items that were waiting for it.
    pub fn fail(&mut self, key: &AdapterKey) -> Vec<T> {
        self.adapters
            .remove(key)
            .map(|a| a.queue.into_iter().map(|q| q.item).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterSource;

    fn key(id: &str) -> AdapterKey {
        AdapterKey::new(AdapterSource::Hub, id)
    }

    #[test]
    fn checked_after_download_load_or_preload_and_forgotten_with_a_failure() {
        let mut r = registry(2, 0);
        let now = Instant::now();
        assert!(r.push(Some(&key("a")), "r1", now), "unknown: downloads");
        assert!(!r.checked(&key("a")));
        assert!(!r.push(Some(&key("a")), "r2", now));
        let queued: Vec<&str> = r.mark_checked(&key("a")).map(|x| *x).collect();
        assert_eq!(queued, ["r1", "r2"], "the requests queued during the download");
        assert!(r.checked(&key("a")));
        r.insert_active(key("p"), 100, now);
        assert!(r.checked(&key("p")), "preloaded");
        let _ = r.fail(&key("a"));
        assert!(!r.checked(&key("a")), "a failure forgets it");
        assert!(r.push(Some(&key("a")), "r3", now), "downloaded again");
        assert!(!r.checked(&key("a")));
    }

    fn registry(max_active: usize, cycle_ms: u64) -> Registry<&'static str> {
        Registry::new(max_active, Duration::from_millis(cycle_ms))
    }

    /// Pushes `item` for `id`, downloads and loads it.
    fn activate(r: &mut Registry<&'static str>, id: &str, item: &'static str, now: Instant) {
        r.push(Some(&key(id)), item, now);
        assert!(r.downloaded(&key(id)));
        assert_eq!(r.plan(now), vec![Action::Load(key(id))]);
        assert!(r.loaded(&key(id), now).is_some());
    }

    fn drain(r: &mut Registry<&'static str>, now: Instant) -> Vec<(&'static str, Option<AdapterLease>)> {
        std::iter::from_fn(|| r.pop_candidate(now)).collect()
    }

    #[test]
    fn one_download_per_adapter() {
        let now = Instant::now();
        let mut r = registry(2, 1000);
        assert!(r.push(Some(&key("a")), "a1", now), "first request starts the download");
        assert!(!r.push(Some(&key("a")), "a2", now), "later ones wait for it");
        assert!(!r.push(None, "base", now));
        assert!(r.push(Some(&AdapterKey::new(AdapterSource::Local, "a")), "local", now));
        assert_eq!(r.state(&key("a")), Some(State::Downloading));
        assert_eq!(r.queued(), 4);
        assert_eq!(r.plan(now), vec![], "nothing to load before the download finished");
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["base"]);
    }

    #[test]
    fn downloads_take_free_slots_only_when_nobody_waits_for_one() {
        let now = Instant::now();
        let mut r = registry(2, 1000);
        assert!(r.push(Some(&key("a")), "a1", now));
        assert!(r.claim_for_download(&key("a"), now), "a free slot and nobody waiting");
        assert_eq!(r.state(&key("a")), Some(State::Loading));
        assert!(!r.claim_for_download(&key("a"), now), "claimed twice");
        r.push(Some(&key("b")), "b1", now);
        assert!(r.downloaded(&key("b")), "b downloads without loading");
        r.push(Some(&key("c")), "c1", now);
        assert!(
            !r.claim_for_download(&key("c"), now),
            "the last free slot went to a download while b waits for it"
        );
        assert_eq!(r.plan(now), vec![Action::Load(key("b"))]);
        // a's download found no slot on the shard: a waits as a downloaded adapter, its slot released.
        assert!(r.downloaded(&key("a")));
        assert_eq!(r.state(&key("a")), Some(State::Downloaded));
        assert_eq!(r.plan(now), vec![Action::Load(key("a"))]);
        assert!(r.downloaded(&key("c")));
        assert_eq!(r.plan(now), vec![], "both slots held");
        assert!(r.loaded(&key("a"), now).is_some());
        // A download that loaded: Loading → Active, and its requests can be prefilled.
        let mut r = registry(1, 1000);
        r.push(Some(&key("d")), "d1", now);
        assert!(r.claim_for_download(&key("d"), now));
        assert!(r.plan(now).is_empty(), "the download's slot is held");
        assert!(r.loaded(&key("d"), now).is_some());
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["d1"]);
        r.push(Some(&key("e")), "e1", now);
        assert!(!r.claim_for_download(&key("e"), now), "no slot free");
    }

    #[test]
    fn a_load_refused_for_memory_waits_for_room_made_by_offloads() {
        let t0 = Instant::now();
        let mut r = registry(8, 1000);
        for (id, bytes) in [("a", 100), ("b", 100)] {
            activate(&mut r, id, "req", t0);
            r.set_bytes(&key(id), bytes);
        }
        drain(&mut r, t0);
        // c (150 bytes) is refused: the device held a and b (200 bytes).
        r.push(Some(&key("c")), "c1", t0);
        assert!(r.downloaded(&key("c")));
        r.set_bytes(&key("c"), 150);
        assert_eq!(r.plan(t0), vec![Action::Load(key("c"))]);
        assert!(r.load_refused(&key("c"), t0));
        assert_eq!(r.state(&key("c")), Some(State::Downloaded));
        assert_eq!(r.queued(), 1, "its request still waits");
        // 200 + 150 > 200: the least recently used idle adapter goes first; 100 + 150 is still over 200,
        // so b goes too, and then c loads.
        assert_eq!(r.plan(t0), vec![Action::Offload(key("a"))]);
        assert_eq!(r.plan(t0), vec![], "an offload in flight covers the need");
        assert!(r.offloaded(&key("a")));
        assert_eq!(r.plan(t0), vec![Action::Offload(key("b"))]);
        assert!(r.offloaded(&key("b")));
        assert_eq!(r.plan(t0), vec![Action::Load(key("c"))]);
        // Alone on the device and refused again: nothing can make room, so it fails, and adapters as large
        // are not loaded for ROOM_KEPT (they would clear the device again).
        assert!(!r.load_refused(&key("c"), t0));
        assert_eq!(r.never_fits(150, t0), Some(150));
        assert_eq!(r.never_fits(149, t0), None);
        assert_eq!(r.never_fits(150, t0 + ROOM_KEPT), None);
        r.fail(&key("c"));
        r.push(Some(&key("f")), "f1", t0);
        assert!(r.downloaded(&key("f")));
        r.set_bytes(&key("f"), 200);
        assert_eq!(r.plan(t0), vec![], "an adapter too large for the device was loaded");
        assert_eq!(r.plan(t0 + ROOM_KEPT), vec![Action::Load(key("f"))]);
        // A download that could not load for want of memory: the room is what the others hold, counted
        // once their own downloads say their sizes; no download claims a slot meanwhile, and the room is
        // forgotten after ROOM_KEPT.
        let mut r = registry(8, 1000);
        r.push(Some(&key("a")), "a1", t0);
        assert!(
            r.claim_for_download(&key("a"), t0),
            "a's download loads it; its size comes later"
        );
        r.push(Some(&key("d")), "d1", t0);
        assert!(r.claim_for_download(&key("d"), t0));
        r.set_bytes(&key("d"), 150);
        assert!(r.load_refused(&key("d"), t0));
        r.set_bytes(&key("a"), 100);
        assert!(r.loaded(&key("a"), t0).is_some());
        drain(&mut r, t0);
        r.push(Some(&key("e")), "e1", t0);
        assert!(
            !r.claim_for_download(&key("e"), t0),
            "a download claimed a slot while memory is short"
        );
        assert!(r.downloaded(&key("e")));
        r.set_bytes(&key("e"), 50);
        // 100 + 150 > 100: d waits (and e behind it) while a is offloaded; then d goes alone and e
        // (150 + 50 > 100) waits.
        assert_eq!(r.plan(t0), vec![Action::Offload(key("a"))]);
        assert!(r.offloaded(&key("a")));
        assert_eq!(r.plan(t0), vec![Action::Load(key("d"))]);
        assert!(r.loaded(&key("d"), t0).is_some());
        assert_eq!(r.plan(t0), vec![], "e waits while d is busy");
        // Once the room is forgotten, e goes beside d.
        assert_eq!(r.plan(t0 + ROOM_KEPT), vec![Action::Load(key("e"))]);
    }

    #[test]
    fn candidates_merge_by_arrival_and_pop_in_that_order() {
        let now = Instant::now();
        let mut r = registry(4, 1000);
        r.push(None, "b0", now);
        activate(&mut r, "x", "x1", now);
        r.push(None, "b2", now);
        r.push(Some(&key("x")), "x3", now);
        r.push(Some(&key("waiting")), "w4", now);
        activate(&mut r, "y", "y5", now);
        r.push(None, "b6", now);
        let order: Vec<_> = r.prefill_candidates().copied().collect();
        assert_eq!(order, vec!["b0", "x1", "b2", "x3", "y5", "b6"]);
        let popped: Vec<_> = drain(&mut r, now)
            .into_iter()
            .map(|(item, lease)| (item, lease.is_some()))
            .collect();
        assert_eq!(
            popped,
            vec![
                ("b0", false),
                ("x1", true),
                ("b2", false),
                ("x3", true),
                ("y5", true),
                ("b6", false)
            ]
        );
        assert_eq!(r.queued(), 1, "the request for the downloading adapter still waits");
    }

    #[test]
    fn slots_bound_loading_and_active_adapters() {
        let now = Instant::now();
        let mut r = registry(2, 1000);
        for id in ["a", "b", "c"] {
            r.push(Some(&key(id)), "req", now);
            assert!(r.downloaded(&key(id)));
        }
        assert_eq!(r.plan(now), vec![Action::Load(key("a")), Action::Load(key("b"))]);
        assert_eq!(r.plan(now), vec![], "no slot, and nothing to offload yet");
        assert_eq!(r.state(&key("c")), Some(State::Downloaded));
    }

    #[test]
    fn idle_adapters_are_offloaded_least_recently_used_first() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        let mut r = registry(2, 1_000_000);
        activate(&mut r, "old", "o", t0);
        let mut leases = drain(&mut r, t0);
        activate(&mut r, "new", "n", t1);
        leases.extend(drain(&mut r, t1));
        assert_eq!(leases.len(), 2);
        r.push(Some(&key("c")), "c", t1);
        assert!(r.downloaded(&key("c")));
        assert_eq!(r.plan(t1), vec![], "both adapters have running requests");
        drop(leases);
        assert_eq!(r.plan(t1), vec![Action::Offload(key("old"))]);
        assert_eq!(r.plan(t1), vec![], "the slot being freed is already counted");
        assert!(r.offloaded(&key("old")));
        assert_eq!(r.plan(t1), vec![Action::Load(key("c"))]);
        assert_eq!(r.state(&key("old")), Some(State::Downloaded));
    }

    #[test]
    fn idle_downloaded_adapters_past_the_bound_are_forgotten_least_recently_used_first() {
        let t0 = Instant::now();
        let mut r = registry(1, 1_000_000);
        r.kept_idle = 2;
        // Three adapters used at t0 + 1, 2, 3 ms, each offloaded for the next: idle and Downloaded.
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let t = t0 + Duration::from_millis(i as u64 + 1);
            activate(&mut r, id, "x", t);
            drop(drain(&mut r, t));
            r.push(Some(&key("next")), "n", t);
            assert!(r.downloaded(&key("next")));
            assert_eq!(r.plan(t), vec![Action::Offload(key(id))]);
            assert!(r.offloaded(&key(id)));
            let _ = r.fail(&key("next"));
        }
        assert_eq!(
            r.state(&key("a")),
            None,
            "the least recently used idle adapter is forgotten"
        );
        assert_eq!(r.state(&key("b")), Some(State::Downloaded));
        assert_eq!(r.state(&key("c")), Some(State::Downloaded));
        // One with a queued request is never forgotten, whatever its age.
        r.kept_idle = 0;
        r.push(Some(&key("b")), "b1", t0);
        r.push(Some(&key("d")), "d1", t0);
        assert!(r.downloaded(&key("d")));
        assert_eq!(r.state(&key("c")), None, "idle, past a bound of none");
        assert_eq!(r.state(&key("b")), Some(State::Downloaded), "b has a queued request");
        assert_eq!(r.state(&key("d")), Some(State::Downloaded));
        // A forgotten adapter asked for again is downloaded again.
        assert!(
            r.push(Some(&key("a")), "a1", t0),
            "a forgotten adapter starts a new download"
        );
    }

    #[test]
    fn an_adapter_with_queued_requests_is_not_idle() {
        let now = Instant::now();
        let mut r = registry(1, 1_000_000);
        activate(&mut r, "busy", "b1", now);
        r.push(Some(&key("c")), "c", now);
        assert!(r.downloaded(&key("c")));
        assert_eq!(r.plan(now), vec![], "busy still has a queued request");
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["b1"]);
    }

    #[test]
    fn cycle_time_drains_then_offloads() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(50);
        let mut r = registry(1, 20);
        activate(&mut r, "a", "a1", t0);
        let lease = r.pop_candidate(t0).expect("a1").1;
        r.push(Some(&key("a")), "a2", t0);
        r.push(Some(&key("b")), "b1", t0);
        assert!(r.downloaded(&key("b")));
        assert_eq!(r.plan(t0), vec![], "a is within its cycle time");
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["a2"]);

        assert_eq!(r.plan(later), vec![], "a has a running request");
        assert!(matches!(r.state(&key("a")), Some(State::Active { draining: true, .. })));
        assert!(!r.has_prefill_candidates(), "a draining adapter takes no prefills");

        drop(lease);
        assert_eq!(r.plan(later), vec![Action::Offload(key("a"))]);
        assert!(r.offloaded(&key("a")));
        assert_eq!(r.plan(later), vec![Action::Load(key("b"))], "b waited longest");
        assert!(r.loaded(&key("b"), later).is_some());
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["b1"]);
        let _b = r.pop_candidate(later);
        assert_eq!(
            r.plan(later),
            vec![],
            "b is running and within its cycle time; a2 waits"
        );
        assert_eq!(r.state(&key("a")), Some(State::Downloaded));
    }

    #[test]
    fn a_new_adapter_serves_before_it_can_be_cycled_out() {
        let now = Instant::now();
        let mut r = registry(1, 0);
        activate(&mut r, "a", "a1", now);
        r.push(Some(&key("b")), "b1", now);
        assert!(r.downloaded(&key("b")));
        assert_eq!(r.plan(now), vec![], "a has not served a1 yet");
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["a1"]);
        let lease = r.pop_candidate(now);
        r.push(Some(&key("a")), "a2", now);
        assert_eq!(r.plan(now), vec![]);
        assert!(!r.has_prefill_candidates(), "a served once and drains now");
        drop(lease);
        assert_eq!(r.plan(now), vec![Action::Offload(key("a"))]);
    }

    #[test]
    fn draining_stops_when_nobody_waits() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(50);
        let mut r = registry(1, 20);
        activate(&mut r, "a", "a1", t0);
        let _lease = r.pop_candidate(t0);
        r.push(Some(&key("b")), "b1", t0);
        assert!(r.downloaded(&key("b")));
        r.push(Some(&key("a")), "a2", t0);
        assert_eq!(r.plan(later), vec![]);
        assert!(!r.has_prefill_candidates());
        r.retain(|item| *item != "b1");
        assert_eq!(r.plan(later), vec![]);
        assert_eq!(r.prefill_candidates().copied().collect::<Vec<_>>(), vec!["a2"]);
    }

    #[test]
    fn failure_returns_the_queue_and_forgets_the_adapter() {
        let now = Instant::now();
        let mut r = registry(1, 1000);
        r.push(Some(&key("bad")), "x1", now);
        r.push(Some(&key("bad")), "x2", now);
        r.push(None, "base", now);
        assert_eq!(r.fail(&key("bad")), vec!["x1", "x2"]);
        assert_eq!(r.state(&key("bad")), None);
        assert!(r.push(Some(&key("bad")), "x3", now), "the next request downloads again");
    }

    #[test]
    fn load_duration_covers_download_and_load() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(30);
        let mut r = registry(1, 1000);
        r.push(Some(&key("a")), "a", t0);
        assert!(r.downloaded(&key("a")));
        assert_eq!(r.plan(t0), vec![Action::Load(key("a"))]);
        assert_eq!(r.loaded(&key("a"), t1), Some(Duration::from_millis(30)));
        assert_eq!(r.loaded(&key("a"), t1), None, "only a loading adapter becomes active");
        assert!(
            !r.downloaded(&key("a")),
            "only a downloading adapter becomes downloaded"
        );
        assert!(!r.offloaded(&key("a")));
        assert_eq!(r.active(), 1);
    }
}
