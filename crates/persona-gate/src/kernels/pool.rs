//! The thread pool of the CPU kernels: persistent workers that wait by blocking, not by spinning,
//! and a governor that stops splitting work when other processes hold the cores.
//!
//! Why this exists: a batch-1 decode step runs a few hundred short parallel sections (one per
//! matmul, 50-500 us each). candle's barrier pool waits for its workers with a pure spin loop, so on a
//! machine whose cores are taken by something else the thread that finished its share burns its time
//! slice spinning while the worker it waits on is descheduled, and every section costs a scheduler
//! slice: decode fell from 3.7 tok/s with one thread to 0.3 tok/s with two on a busy 2-core box
//! (issue 18). Here:
//! - the caller publishes a section and works on it too, taking chunks from a shared cursor, so a
//!   worker that is not running never holds up chunks it has not claimed;
//! - a worker spins only briefly for the next section (sections follow each other within
//!   microseconds during decode), then sleeps on a condition variable (a futex);
//! - the caller waits for chunks still running on other threads by spinning at most about as long
//!   as its own share took, then sleeps until the last chunk wakes it, so a descheduled worker gets
//!   the core instead of a spinning caller;
//! - a [`Governor`] times sections run in parallel and sections run inline on the caller alone, kind
//!   by kind, and runs them the way that is currently faster: in parallel on an idle machine, inline
//!   when other processes hold the cores (then every section would wait for a preempted thread).
//!
//! Results never depend on the thread count or the governor: callers split work into chunks whose
//! outputs are disjoint and computed the same way whichever thread runs them, in whatever order.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next section before sleeping: long enough to bridge the
/// gaps between a decode step's matmuls (norms, RoPE, the KV cache: tens of microseconds), short
/// enough that a worker left idle gives its core back almost at once.
const WORKER_SPIN: Duration = Duration::from_micros(150);

/// Bounds of the caller's spin while chunks of other threads are still running; within them it spins
/// for as long as its own share of the section took.
const CALLER_SPIN_MIN: Duration = Duration::from_micros(2);
const CALLER_SPIN_MAX: Duration = Duration::from_micros(100);

/// Most threads a pool runs, caller included.
pub const MAX_THREADS: usize = 256;

type Payload = Box<dyn Any + Send>;

/// Calls the caller's closure through a type-erased pointer.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn call<F: Fn(usize) + Sync>(data: *const (), chunk: usize) {
    // SAFETY: guaranteed by the caller (see `Pool::run`: the closure outlives every chunk).
    unsafe { (*(data as *const F))(chunk) }
}

/// One parallel section as the workers see it.
#[derive(Clone, Copy)]
struct Job {
    call: unsafe fn(*const (), usize),
    /// The caller's closure; valid until every chunk of the section has finished.
    data: *const (),
    n_chunks: usize,
}

/// What the caller and the workers share.
struct Shared {
    /// Section epoch (high 32 bits) and chunks not yet claimed (low 32 bits). A thread claims a
    /// chunk with a compare-exchange that also checks the epoch, so a thread that fell asleep in an
    /// old section can never take (and lose) a chunk of a newer one.
    state: AtomicU64,
    /// The current section. Written by the caller only while no chunk is claimed or running (see
    /// `Pool::run`); read by a thread only after it claimed a chunk of that section.
    job: UnsafeCell<Job>,
    /// Chunks of the current section not yet finished (claimed or not).
    remaining: AtomicUsize,
    /// Workers that take part in sections (the pool's thread count minus the caller). Workers with a
    /// higher index stay asleep.
    active: AtomicUsize,
    /// Workers sleeping on `work_cv`; the caller notifies only when there are any.
    sleepers: AtomicUsize,
    work_lock: Mutex<()>,
    work_cv: Condvar,
    /// The caller sleeps on `done_cv`; the thread that finishes the last chunk notifies it.
    caller_sleeping: AtomicBool,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    /// The first panic of a section's chunks, re-raised on the caller.
    panic: Mutex<Option<Payload>>,
    stop: AtomicBool,
}

// SAFETY: `job` is the only field that is not Sync by itself; it is written by the one caller that
// holds the pool's section lock, at a time when no other thread can read it, and read by workers
// only while the section it describes is running (the protocol in `Pool::run`).
unsafe impl Sync for Shared {}
// SAFETY: `job` holds a raw pointer that is only dereferenced under the same protocol.
unsafe impl Send for Shared {}

fn pack(epoch: u32, unclaimed: usize) -> u64 {
    ((epoch as u64) << 32) | unclaimed as u64
}

fn epoch_of(state: u64) -> u32 {
    (state >> 32) as u32
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The pool's mutexes guard no invariant a panic could break (the data is `()`, or an
    // `Option` that is replaced whole).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Claim one chunk of section `epoch`: its index, or `None` when that section has no unclaimed
    /// chunk left (or is over). Chunks are handed out in increasing order.
    fn claim(&self, epoch: u32) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let unclaimed = (s & 0xffff_ffff) as usize;
            if epoch_of(s) != epoch || unclaimed == 0 {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(s, s - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: we hold an unfinished chunk of `epoch`, so that section is running
                    // and `job` describes it (the caller writes `job` only between sections, and
                    // this claim synchronizes with the store that published it).
                    let n_chunks = unsafe { (*self.job.get()).n_chunks };
                    return Some(n_chunks - unclaimed);
                }
                Err(now) => s = now,
            }
        }
    }

    /// Run claimed chunk `c` of the current section and mark it finished.
    fn run_chunk(&self, c: usize) {
        // SAFETY: as in `claim`, the section is running while one of its chunks is unfinished.
        let job = unsafe { *self.job.get() };
        // SAFETY: the closure lives until every chunk has finished, and this one has not.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (job.call)(job.data, c) }));
        if let Err(p) = r {
            lock(&self.panic).get_or_insert(p);
        }
        self.finish_chunk();
    }

    fn finish_chunk(&self) {
        // SeqCst pairs with the caller's store of `caller_sleeping`: either it sees remaining == 0
        // before sleeping, or we see it sleeping and wake it.
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && self.caller_sleeping.load(Ordering::SeqCst)
        {
            drop(lock(&self.done_lock));
            self.done_cv.notify_one();
        }
    }

    /// Wake the workers that sleep (the new section is already published).
    fn wake_workers(&self) {
        // SeqCst pairs with the worker's increment of `sleepers` before it checks the epoch.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders us after any worker between its check and its wait.
            drop(lock(&self.work_lock));
            self.work_cv.notify_all();
        }
    }

    /// The caller waits for chunks other threads still run: spin up to `spin`, then sleep.
    fn wait_done(&self, spin: Duration) {
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                if self.remaining.load(Ordering::Acquire) == 0 {
                    return;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= spin {
                break;
            }
        }
        let mut g = lock(&self.done_lock);
        self.caller_sleeping.store(true, Ordering::SeqCst);
        while self.remaining.load(Ordering::SeqCst) != 0 {
            g = self.done_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.caller_sleeping.store(false, Ordering::SeqCst);
    }

    /// A worker waits for a section newer than `seen`: spin for `spin`, then sleep. `None` when the
    /// pool shuts down.
    fn wait_for_work(&self, seen: u32, spin: Duration) -> Option<u32> {
        let start = Instant::now();
        loop {
            for _ in 0..64 {
                let e = epoch_of(self.state.load(Ordering::Acquire));
                if e != seen {
                    return Some(e);
                }
                if self.stop.load(Ordering::Relaxed) {
                    return None;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= spin {
                break;
            }
        }
        let mut g = lock(&self.work_lock);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let out = loop {
            if self.stop.load(Ordering::SeqCst) {
                break None;
            }
            let e = epoch_of(self.state.load(Ordering::SeqCst));
            if e != seen {
                break Some(e);
            }
            g = self.work_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

fn worker(shared: Arc<Shared>, index: usize) {
    // Epoch 0 is the pool's start: a worker started after sections were published first tries the
    // current one (claiming checks that it still has chunks).
    let mut seen = 0;
    let mut spin = WORKER_SPIN;
    while let Some(epoch) = shared.wait_for_work(seen, spin) {
        seen = epoch;
        if index >= shared.active.load(Ordering::Relaxed) {
            // Not part of the pool's current thread count: sleep right away next time.
            spin = Duration::ZERO;
            continue;
        }
        spin = WORKER_SPIN;
        while let Some(c) = shared.claim(epoch) {
            shared.run_chunk(c);
        }
    }
}

/// When sections run in parallel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GovernorMode {
    /// Whichever of parallel and inline is measured faster (the default).
    Adaptive,
    /// Always parallel (`PGATE_GOVERNOR=off`): to measure what the governor buys.
    AlwaysParallel,
}

/// What a section cost in each mode, for one kind of section (one matmul size).
#[derive(Debug, Clone, Copy)]
struct KeyCost {
    key: u64,
    /// Smoothed nanoseconds inline (0) and parallel (1); NaN until measured.
    ns: [f64; 2],
}

/// Decides whether sections run in parallel or inline on the caller, by measuring both.
///
/// Why measure rather than predict: whether a second thread helps depends on what else runs on the
/// machine. On an idle 2-core box batch-1 decode is 1.3-1.4x faster on two threads (memory bandwidth
/// grows with the threads reading); with one competing CPU-bound process it is slower than one
/// thread, because every section waits for whichever of its threads the scheduler has just
/// preempted. The caller's own time cannot tell these apart (two threads also slow each other
/// down through shared bandwidth), so the governor times sections in both modes and compares them
/// kind by kind: each section carries a key (the weight bytes its matmul reads), and a window of
/// [`Governor::WINDOW`] sections in the current mode is compared with the other mode's smoothed
/// times for the same keys, so the mix of sections in a window does not matter. The preferred
/// mode changes when the other is at least [`Governor::MARGIN`] cheaper; the other mode is measured
/// again (for a quarter window) after a number of windows that doubles while the preference holds
/// (up to [`Governor::EXPLORE_MAX`]) and right away when the current mode gets slower than the
/// other's last times (load came or went). A window that is clearly lost (twice the other mode's
/// time and a millisecond more) ends at once, so a stalled exploration costs one stall.
#[derive(Debug, Clone)]
pub struct Governor {
    mode: GovernorMode,
    window: u32,
    parallel: bool,
    /// The current window measures the mode that is not preferred.
    exploring: bool,
    costs: Vec<KeyCost>,
    win_sections: u32,
    /// This window: time in the current mode, and the other mode's times for the same sections
    /// (only sections whose key has both).
    win_ns: f64,
    win_other_ns: f64,
    explore_every: u32,
    since_explore: u32,
    /// Sections run in parallel / inline by the governor's choice (for tests and diagnostics).
    pub parallel_sections: u64,
    pub inline_sections: u64,
}

impl Governor {
    /// Sections per measurement window: about half a q15 decode step.
    pub const WINDOW: u32 = 128;
    /// How much cheaper the other mode must be to switch.
    pub const MARGIN: f64 = 0.05;
    pub const EXPLORE_MIN: u32 = 4;
    /// At most this many windows between measurements of the other mode: measuring the slower mode
    /// then costs under 0.5% of the time, and a change of load is still caught within ~1.5 s of
    /// q15 decode.
    pub const EXPLORE_MAX: u32 = 64;
    /// Section kinds remembered (a model has a handful of matmul shapes per batch size).
    const KEYS: usize = 64;
    /// Weight of a new time in a key's smoothed time.
    const ALPHA: f64 = 0.25;
    /// A window is lost early when it took this many times the other mode's time plus the slack
    /// (which keeps an interrupt or a page fault on an idle machine from ending one).
    const LOST: f64 = 2.0;
    const LOST_SLACK_NS: f64 = 1e6;

    pub fn new(mode: GovernorMode) -> Self {
        Self {
            mode,
            window: Self::WINDOW,
            parallel: true,
            exploring: false,
            costs: vec![
                KeyCost {
                    key: 0,
                    ns: [f64::NAN; 2]
                };
                Self::KEYS
            ],
            win_sections: 0,
            win_ns: 0.0,
            win_other_ns: 0.0,
            explore_every: Self::EXPLORE_MIN,
            since_explore: 0,
            parallel_sections: 0,
            inline_sections: 0,
        }
    }

    /// Whether the next section should run in parallel.
    pub fn parallel(&mut self) -> bool {
        let p = self.parallel || self.mode == GovernorMode::AlwaysParallel;
        if p {
            self.parallel_sections += 1;
        } else {
            self.inline_sections += 1;
        }
        p
    }

    /// Record a section of kind `key` (0: not comparable, not recorded) that took `elapsed` in the
    /// mode [`Self::parallel`] chose.
    pub fn record(&mut self, key: u64, elapsed: Duration) {
        if self.mode == GovernorMode::AlwaysParallel || key == 0 {
            return;
        }
        let m = self.parallel as usize;
        let t = elapsed.as_nanos() as f64;
        let slot = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % Self::KEYS;
        let c = &mut self.costs[slot];
        if c.key != key {
            *c = KeyCost {
                key,
                ns: [f64::NAN; 2],
            };
        }
        if c.ns[1 - m].is_finite() {
            self.win_ns += t;
            self.win_other_ns += c.ns[1 - m];
        }
        c.ns[m] = if c.ns[m].is_finite() {
            c.ns[m] + Self::ALPHA * (t - c.ns[m])
        } else {
            t
        };
        self.win_sections += 1;
        // Explorations are short: the other mode's times per key are known, so a quarter window
        // gives the ratio, and on an idle machine inline sections cost 1.3-1.4x.
        let len = if self.exploring {
            (self.window / 4).max(1)
        } else {
            self.window
        };
        // A window already clearly lost ends now: on a busy machine one parallel section can wait
        // a whole scheduler slice (milliseconds) for a preempted thread, and a window of those
        // would cost as much as the collapse this governor exists to avoid.
        let lost = self.win_ns > Self::LOST * self.win_other_ns + Self::LOST_SLACK_NS;
        if self.win_sections >= len || lost {
            self.end_window();
        }
    }

    fn end_window(&mut self) {
        // This window's time relative to the other mode's times for the same sections.
        let ratio = (self.win_other_ns > 0.0).then(|| self.win_ns / self.win_other_ns);
        self.win_sections = 0;
        self.win_ns = 0.0;
        self.win_other_ns = 0.0;
        if self.exploring {
            self.exploring = false;
            self.since_explore = 0;
            if ratio.is_some_and(|r| r < 1.0 - Self::MARGIN) {
                // The explored mode wins: keep it, and check the old one again soon.
                self.explore_every = Self::EXPLORE_MIN;
            } else {
                self.parallel = !self.parallel;
                self.explore_every = (self.explore_every * 2).min(Self::EXPLORE_MAX);
            }
            return;
        }
        self.since_explore += 1;
        let slower = ratio.is_none_or(|r| r > 1.0 + Self::MARGIN);
        if slower || self.since_explore >= self.explore_every {
            self.parallel = !self.parallel;
            self.exploring = true;
        }
    }

    /// A governor with `window` sections per window.
    #[cfg(test)]
    pub fn with_window(mode: GovernorMode, window: u32) -> Self {
        Self {
            window,
            ..Self::new(mode)
        }
    }

    /// The preferred mode: parallel or not (not counting an exploration under way).
    #[cfg(test)]
    pub fn prefers_parallel(&self) -> bool {
        self.parallel != self.exploring
    }
}

/// What the thread running a section owns.
struct Section {
    epoch: u32,
    governor: Governor,
}

/// A pool of `threads - 1` persistent workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    /// Held by the thread running a section; another thread that finds it held (a second engine,
    /// tests in parallel, a chunk that itself runs a section) runs its section inline instead of
    /// waiting.
    section: Mutex<Section>,
    threads: AtomicUsize,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// A pool of `threads` threads (the caller counts as one; clamped to 1..=[`MAX_THREADS`]).
    pub fn new(threads: usize, mode: GovernorMode) -> Self {
        Self::with_governor(threads, Governor::new(mode))
    }

    fn with_governor(threads: usize, governor: Governor) -> Self {
        let pool = Self {
            shared: Arc::new(Shared {
                state: AtomicU64::new(0),
                job: UnsafeCell::new(Job {
                    call: call::<fn(usize)>,
                    data: std::ptr::null(),
                    n_chunks: 0,
                }),
                remaining: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                sleepers: AtomicUsize::new(0),
                work_lock: Mutex::new(()),
                work_cv: Condvar::new(),
                caller_sleeping: AtomicBool::new(false),
                done_lock: Mutex::new(()),
                done_cv: Condvar::new(),
                panic: Mutex::new(None),
                stop: AtomicBool::new(false),
            }),
            section: Mutex::new(Section { epoch: 0, governor }),
            threads: AtomicUsize::new(1),
            workers: Mutex::new(Vec::new()),
        };
        pool.set_threads(threads);
        pool
    }

    /// Threads a section may use, the caller included.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }

    /// Change the thread count (clamped to 1..=[`MAX_THREADS`]); applies from the next section.
    /// Workers are started as needed and never stopped: extra ones sleep.
    pub fn set_threads(&self, threads: usize) {
        let threads = threads.clamp(1, MAX_THREADS);
        let mut workers = lock(&self.workers);
        while workers.len() < threads - 1 {
            let shared = self.shared.clone();
            let index = workers.len();
            let spawned = std::thread::Builder::new()
                .name(format!("pgate-kernel-{index}"))
                .spawn(move || worker(shared, index));
            match spawned {
                Ok(h) => workers.push(h),
                // Out of threads: run with those we have (sections only get slower, not wrong).
                Err(_) => break,
            }
        }
        let threads = threads.min(workers.len() + 1);
        self.shared.active.store(threads - 1, Ordering::Relaxed);
        self.threads.store(threads, Ordering::Relaxed);
    }

    /// A copy of the governor's state (for tests).
    #[cfg(test)]
    pub fn governor(&self) -> Governor {
        lock(&self.section).governor.clone()
    }

    /// Run `f(c)` for every chunk `c` in `0..n_chunks`, each exactly once, spread over the pool's
    /// threads (or all on the caller: one thread, a single chunk, another section running, or the
    /// governor says so). `key` names the kind of section for the governor (sections with the same
    /// key do the same work, e.g. one matmul shape; 0: none). Returns when every chunk has
    /// finished; a panic in a chunk is re-raised here after the others finished.
    pub fn run<F: Fn(usize) + Sync>(&self, n_chunks: usize, key: u64, f: F) {
        let inline = |f: &F| (0..n_chunks).for_each(f);
        if n_chunks == 0 {
            return;
        }
        // The chunk count shares a 64-bit word with the epoch.
        if self.threads() == 1 || n_chunks == 1 || n_chunks > u32::MAX as usize {
            return inline(&f);
        }
        let mut sec = match self.section.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return inline(&f),
        };
        let t0 = Instant::now();
        if !sec.governor.parallel() {
            inline(&f);
            sec.governor.record(key, t0.elapsed());
            return;
        }
        let sh = &*self.shared;
        sec.epoch = sec.epoch.wrapping_add(1);
        let epoch = sec.epoch;
        // SAFETY: no other thread reads `job` now: the previous section ended with every chunk
        // finished (its `remaining` seen at 0 with Acquire), and threads read `job` only after
        // claiming a chunk of the current epoch, which the store to `state` below publishes.
        // `f` outlives the section: this function returns only after `remaining` reaches 0.
        unsafe {
            *sh.job.get() = Job {
                call: call::<F>,
                data: &f as *const F as *const (),
                n_chunks,
            };
        }
        sh.remaining.store(n_chunks, Ordering::Relaxed);
        sh.state.store(pack(epoch, n_chunks), Ordering::SeqCst);
        sh.wake_workers();

        while let Some(c) = sh.claim(epoch) {
            sh.run_chunk(c);
        }
        sh.wait_done(t0.elapsed().clamp(CALLER_SPIN_MIN, CALLER_SPIN_MAX));
        sec.governor.record(key, t0.elapsed());
        drop(sec);
        if let Some(p) = lock(&sh.panic).take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        drop(lock(&self.shared.work_lock));
        self.shared.work_cv.notify_all();
        for h in lock(&self.workers).drain(..) {
            let _ = h.join();
        }
    }
}

/// Thread count asked for through [`set_threads`] before the global pool existed (0: none).
static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// A positive thread count from environment variable `var`: `Ok(None)` when unset.
fn env_threads(var: &str) -> crate::Result<Option<usize>> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(Some(n)),
            _ => Err(crate::Error::InvalidValue(format!(
                "{var}={v:?}: expected a thread count from 1 to {MAX_THREADS}"
            ))),
        },
    }
}

/// The default thread count: `PGATE_THREADS`, else `CANDLE_NUM_THREADS`, else candle's own default
/// (`RAYON_NUM_THREADS`, else the physical cores), so that without settings our kernels use as many
/// threads as candle's ops. Invalid values are skipped here ([`init_threads`] reports them).
fn default_threads() -> usize {
    ["PGATE_THREADS", "CANDLE_NUM_THREADS"]
        .iter()
        .find_map(|v| env_threads(v).ok().flatten())
        .unwrap_or_else(candle_core::utils::get_num_threads)
        .clamp(1, MAX_THREADS)
}

fn governor_mode() -> GovernorMode {
    match std::env::var("PGATE_GOVERNOR").as_deref() {
        Ok("off") | Ok("0") => GovernorMode::AlwaysParallel,
        _ => GovernorMode::Adaptive,
    }
}

/// The process-wide pool the kernels use, started on first use.
pub(crate) fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| {
        let n = match REQUESTED.load(Ordering::Relaxed) {
            0 => default_threads(),
            n => n,
        };
        Pool::new(n, governor_mode())
    })
}

/// Set how many threads the CPU kernels (compact quantized matmuls, batch-invariant attention) use,
/// the calling thread included; applies from the next matmul. candle's own operations keep candle's
/// pool, which candle sizes once, from `CANDLE_NUM_THREADS` or `RAYON_NUM_THREADS`, when it first
/// runs (see [`init_threads`]).
pub fn set_threads(n: usize) -> crate::Result<()> {
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(crate::Error::InvalidValue(format!(
            "thread count {n}: expected 1 to {MAX_THREADS}"
        )));
    }
    REQUESTED.store(n, Ordering::Relaxed);
    if let Some(p) = GLOBAL.get() {
        p.set_threads(n);
    }
    Ok(())
}

/// How many threads the CPU kernels use (without starting them).
pub fn threads() -> usize {
    match (GLOBAL.get(), REQUESTED.load(Ordering::Relaxed)) {
        (Some(p), _) => p.threads(),
        (None, 0) => default_threads(),
        (None, n) => n,
    }
}

/// Size every CPU thread pool of the process at startup: `n` threads (a `--threads` flag), else
/// `PGATE_THREADS` when set, else the defaults. With a count, it sets `CANDLE_NUM_THREADS` and
/// `RAYON_NUM_THREADS` (read once by candle's pool and by rayon's global pool when they start) and
/// [`set_threads`]. Returns the kernels' thread count; an invalid `PGATE_THREADS` is an error.
///
/// # Safety
/// It sets environment variables: call it before any other thread exists (the start of `main`),
/// since a concurrent read of the environment by another thread is undefined behaviour on Unix.
pub unsafe fn init_threads(n: Option<usize>) -> crate::Result<usize> {
    let n = match n {
        Some(n) => Some(n),
        None => env_threads("PGATE_THREADS")?,
    };
    if let Some(n) = n {
        set_threads(n)?;
        let v = n.to_string();
        std::env::set_var("CANDLE_NUM_THREADS", &v);
        std::env::set_var("RAYON_NUM_THREADS", &v);
    }
    Ok(threads())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every chunk runs exactly once, for many sections in a row (workers spinning, sleeping, and
    /// waking mid-section), whatever the thread count and chunk count.
    #[test]
    fn every_chunk_runs_once() {
        for threads in [1, 2, 3, 5] {
            let pool = Pool::new(threads, GovernorMode::AlwaysParallel);
            for round in 0..300 {
                let n = 1 + (round * 7) % 40;
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.run(n, 0, |c| {
                    hits[c].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads}, round {round}"
                );
                if round % 50 == 0 {
                    // Let the workers fall asleep, so the next section wakes them.
                    std::thread::sleep(WORKER_SPIN * 3);
                }
            }
        }
    }

    /// Sections from several threads at once all complete (one runs on the pool, the others
    /// inline), and a chunk may itself run a section (inline) without deadlocking.
    #[test]
    fn concurrent_and_nested_sections() {
        let pool = Pool::new(3, GovernorMode::AlwaysParallel);
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        pool.run(8, 0, |_| {
                            pool.run(3, 0, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 8 * 3);
    }

    /// A panic in a chunk reaches the caller after the other chunks finished, and the pool keeps
    /// working.
    #[test]
    fn panics_propagate_and_the_pool_survives() {
        let pool = Pool::new(2, GovernorMode::AlwaysParallel);
        let done = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, 0, |c| {
                if c == 5 {
                    panic!("chunk 5");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 15);
        let n = AtomicUsize::new(0);
        pool.run(16, 0, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }

    /// The thread count can grow and shrink; chunks then run on at most that many threads.
    #[test]
    fn thread_count_changes() {
        let pool = Pool::new(1, GovernorMode::AlwaysParallel);
        let caller = std::thread::current().id();
        for threads in [1, 4, 2, 1, 3] {
            pool.set_threads(threads);
            assert_eq!(pool.threads(), threads);
            let ids = Mutex::new(std::collections::HashSet::new());
            for _ in 0..50 {
                pool.run(64, 0, |_| {
                    lock(&ids).insert(std::thread::current().id());
                    std::hint::black_box((0..2000).sum::<u64>());
                });
            }
            let ids = ids.into_inner().unwrap();
            if threads == 1 {
                assert_eq!(ids, [caller].into_iter().collect());
            }
            assert!(
                ids.len() <= threads,
                "{} threads used, {threads} set",
                ids.len()
            );
        }
        assert!(set_threads(0).is_err());
        assert!(set_threads(MAX_THREADS + 1).is_err());
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feed `n` sections of 8 kinds (sizes 1x..8x) whose times are `parallel` / `inline` us per
    /// size unit (+-10% jitter); returns the fraction run in parallel.
    fn feed(g: &mut Governor, n: usize, parallel: u64, inline: u64, seed: &mut u64) -> f64 {
        let before = g.parallel_sections;
        for i in 0..n {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jitter = 0.9 + 0.2 * ((*seed >> 40) as f64 / (1u64 << 24) as f64);
            let size = 1 + (i as u64 * 5) % 8;
            let per = if g.parallel() { parallel } else { inline };
            g.record(size, us(per * size).mul_f64(jitter));
        }
        (g.parallel_sections - before) as f64 / n as f64
    }

    /// Idle machine (parallel 0.7x inline): parallel nearly always, inline only to re-measure.
    /// Loaded (parallel 1.4x inline): inline within a few windows and nearly always after. Load
    /// gone: back to parallel within the longest exploration interval.
    #[test]
    fn governor_prefers_the_faster_mode() {
        let mut g = Governor::new(GovernorMode::Adaptive);
        let mut seed = 1;
        let w = Governor::WINDOW as usize;
        let idle = feed(&mut g, 200 * w, 70, 100, &mut seed);
        assert!(idle > 0.97, "idle: parallel {idle}");
        assert!(g.prefers_parallel());
        feed(&mut g, 3 * w, 140, 100, &mut seed);
        assert!(!g.prefers_parallel());
        let loaded = feed(&mut g, 200 * w, 140, 100, &mut seed);
        assert!(loaded < 0.03, "loaded: parallel {loaded}");
        feed(
            &mut g,
            (Governor::EXPLORE_MAX as usize + 2) * w,
            70,
            100,
            &mut seed,
        );
        assert!(g.prefers_parallel());
        // Within the margin: no flapping, the current mode stays.
        let close = feed(&mut g, 100 * w, 98, 100, &mut seed);
        assert!(close > 0.97, "close: parallel {close}");
        // Busy machine where a parallel section waits a scheduler slice for a preempted thread:
        // each exploration is cut short after one such section.
        let stalls = feed(&mut g, 500 * w, 4000, 100, &mut seed);
        assert!(stalls < 0.002, "stalling: parallel {stalls}");
        // PGATE_GOVERNOR=off: always parallel.
        let mut g = Governor::new(GovernorMode::AlwaysParallel);
        assert_eq!(feed(&mut g, 10 * w, 500, 100, &mut seed), 1.0);
    }

    /// End to end: when chunks on the workers stall (as when another process holds their core),
    /// the pool soon runs sections on the caller alone. So that every parallel section does stall
    /// (other tests may keep the worker from waking in time), the caller's chunks of a parallel
    /// section wait until the worker has taken one.
    #[test]
    fn stalled_workers_send_sections_inline() {
        let pool = Pool::with_governor(2, Governor::with_window(GovernorMode::Adaptive, 8));
        let caller = std::thread::current().id();
        let stalls = AtomicUsize::new(0);
        let taken = AtomicBool::new(false);
        let section = || {
            let parallel = pool.governor().parallel;
            taken.store(false, Ordering::SeqCst);
            pool.run(8, 1, |_| {
                if std::thread::current().id() != caller {
                    taken.store(true, Ordering::SeqCst);
                    stalls.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(3));
                } else {
                    let t = Instant::now();
                    while t.elapsed() < us(50)
                        || (parallel
                            && !taken.load(Ordering::SeqCst)
                            && t.elapsed() < Duration::from_millis(200))
                    {
                        std::hint::spin_loop();
                    }
                }
            });
            parallel
        };
        // The first window is parallel (every section stalls); then a few windows to settle.
        for _ in 0..5 * 8 {
            section();
        }
        let (before, g) = (stalls.load(Ordering::Relaxed), pool.governor());
        assert!(before >= 8, "{before} stalls in the first window");
        assert!(!g.prefers_parallel());
        // 10 windows: inline apart from short explorations (2 sections every 4+ windows).
        let parallel = (0..10 * 8).filter(|_| section()).count();
        let after = pool.governor();
        let stalled = stalls.load(Ordering::Relaxed) - before;
        let inline = after.inline_sections - g.inline_sections;
        assert!(
            parallel <= 4 && inline >= 76,
            "{parallel} parallel ({stalled} stalls), {inline} inline"
        );
    }
}
