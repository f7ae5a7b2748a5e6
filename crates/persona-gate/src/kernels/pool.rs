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
//! - a [`Governor`] times every section against an estimate of running it on the caller alone; when
//!   parallel sections stop paying (stragglers: a loaded machine), sections run inline on the calling
//!   thread for a while, and a probe later tries parallel again (backing off while probes fail).
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
    let mut seen = epoch_of(shared.state.load(Ordering::Acquire));
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
    /// Parallel unless recent sections show the other threads cannot keep up (the default).
    Adaptive,
    /// Always parallel (`PGATE_GOVERNOR=off`): to measure what the governor buys.
    AlwaysParallel,
}

/// Decides per section whether to run it in parallel, from how recent parallel sections went.
///
/// Each parallel section is compared with an estimate of running it on the caller alone (the
/// caller's own time per chunk times the number of chunks). The differences are averaged with
/// exponential decay (about the last 16 sections); when the average says parallel sections cost
/// more than [`Governor::TRIGGER`] over inline ones, the next sections run inline for a back-off
/// period. After it a probe runs sections in parallel again: if they still lose, the back-off
/// doubles (up to [`Governor::BACKOFF_MAX`]); after [`Governor::PROBE_SECTIONS`] good sections it
/// resets.
#[derive(Debug, Clone)]
pub struct Governor {
    mode: GovernorMode,
    /// Decayed sum of (parallel time - inline estimate), seconds.
    score: f64,
    inline_until: Option<Instant>,
    probing: bool,
    probe_sections: u32,
    backoff: Duration,
    /// First back-off ([`Governor::BACKOFF_MIN`]; longer in tests on busy machines).
    backoff_min: Duration,
    /// Sections run in parallel / inline by the governor's choice (for tests and diagnostics).
    pub parallel_sections: u64,
    pub inline_sections: u64,
}

impl Governor {
    /// Loss over inline that switches to inline: one descheduled worker costs a scheduler slice
    /// (milliseconds), far above this; the noise of an idle machine (a few microseconds a section,
    /// an occasional interrupt) stays below it.
    pub const TRIGGER: Duration = Duration::from_micros(250);
    pub const BACKOFF_MIN: Duration = Duration::from_millis(20);
    pub const BACKOFF_MAX: Duration = Duration::from_millis(1000);
    pub const PROBE_SECTIONS: u32 = 64;
    const DECAY: f64 = 1.0 / 16.0;

    pub fn new(mode: GovernorMode) -> Self {
        Self {
            mode,
            score: 0.0,
            inline_until: None,
            probing: false,
            probe_sections: 0,
            backoff: Self::BACKOFF_MIN,
            backoff_min: Self::BACKOFF_MIN,
            parallel_sections: 0,
            inline_sections: 0,
        }
    }

    /// Whether the section starting at `now` should run in parallel.
    pub fn parallel(&mut self, now: Instant) -> bool {
        if let Some(until) = self.inline_until {
            if now < until {
                self.inline_sections += 1;
                return false;
            }
            self.inline_until = None;
            self.probing = true;
            self.probe_sections = 0;
            self.score = 0.0;
        }
        self.parallel_sections += 1;
        true
    }

    /// Record a parallel section that ended at `now`: it took `elapsed`; the caller alone would
    /// have taken about `inline_estimate`.
    pub fn record(&mut self, now: Instant, elapsed: Duration, inline_estimate: Duration) {
        if self.mode == GovernorMode::AlwaysParallel {
            return;
        }
        let d = elapsed.as_secs_f64() - inline_estimate.as_secs_f64();
        self.score = self.score * (1.0 - Self::DECAY) + d;
        if self.score > Self::TRIGGER.as_secs_f64() {
            if self.probing {
                self.backoff = (self.backoff * 2).min(Self::BACKOFF_MAX);
            }
            self.inline_until = Some(now + self.backoff);
            self.probing = false;
            self.score = 0.0;
        } else if self.probing {
            self.probe_sections += 1;
            if self.probe_sections >= Self::PROBE_SECTIONS {
                self.probing = false;
                self.backoff = self.backoff_min;
            }
        }
    }

    /// A governor whose first back-off is `backoff`.
    #[cfg(test)]
    pub fn with_backoff(mode: GovernorMode, backoff: Duration) -> Self {
        Self {
            backoff,
            backoff_min: backoff,
            ..Self::new(mode)
        }
    }

    /// Whether sections currently run inline.
    #[cfg(test)]
    pub fn is_inline(&self, now: Instant) -> bool {
        self.inline_until.is_some_and(|t| now < t)
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
    /// governor says so). Returns when every chunk has finished; a panic in a chunk is re-raised
    /// here after the others finished.
    pub fn run<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
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
        if !sec.governor.parallel(t0) {
            drop(sec);
            return inline(&f);
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

        let mut mine = 0u32;
        while let Some(c) = sh.claim(epoch) {
            sh.run_chunk(c);
            mine += 1;
        }
        let t1 = Instant::now();
        let own = t1 - t0;
        sh.wait_done(own.clamp(CALLER_SPIN_MIN, CALLER_SPIN_MAX));
        let t2 = Instant::now();
        if mine > 0 {
            let estimate = own.mul_f64(n_chunks as f64 / mine as f64);
            sec.governor.record(t2, t2 - t0, estimate);
        }
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
                pool.run(n, |c| {
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
                        pool.run(8, |_| {
                            pool.run(3, |_| {
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
            pool.run(16, |c| {
                if c == 5 {
                    panic!("chunk 5");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 15);
        let n = AtomicUsize::new(0);
        pool.run(16, |_| {
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
                pool.run(64, |_| {
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

    /// Parallel sections that beat inline keep the governor parallel; stragglers that cost a
    /// scheduler slice switch it to inline for the back-off, probes that fail double the back-off,
    /// and a good probe resets it.
    #[test]
    fn governor_backs_off_and_probes() {
        let mut g = Governor::new(GovernorMode::Adaptive);
        let mut now = Instant::now();
        // Idle machine: half the inline time, and an occasional 1 ms hiccup.
        for i in 0..200 {
            assert!(g.parallel(now));
            let elapsed = if i % 50 == 49 { us(1000) } else { us(100) };
            g.record(now, elapsed, us(200));
            now += us(150);
        }
        assert_eq!(g.inline_sections, 0);
        // Loaded: a worker descheduled mid-chunk makes the caller wait 3 ms.
        assert!(g.parallel(now));
        g.record(now, us(3000), us(200));
        assert!(g.is_inline(now));
        assert!(!g.parallel(now + us(10)));
        // The probe after the back-off fails again: twice as long inline.
        now += Governor::BACKOFF_MIN;
        assert!(g.parallel(now));
        g.record(now, us(3000), us(200));
        assert!(g.is_inline(now + Governor::BACKOFF_MIN * 2 - us(1)));
        assert!(!g.is_inline(now + Governor::BACKOFF_MIN * 2));
        // The load is gone: the probe passes and the back-off resets.
        now += Governor::BACKOFF_MIN * 2;
        for _ in 0..Governor::PROBE_SECTIONS {
            assert!(g.parallel(now));
            g.record(now, us(100), us(200));
            now += us(150);
        }
        g.record(now, us(3000), us(200));
        assert!(g.is_inline(now + Governor::BACKOFF_MIN - us(1)));
        assert!(!g.is_inline(now + Governor::BACKOFF_MIN));
        // PGATE_GOVERNOR=off: never inline.
        let mut g = Governor::new(GovernorMode::AlwaysParallel);
        g.record(now, us(30_000), us(200));
        assert!(g.parallel(now));
    }

    /// End to end: when chunks on the workers stall (as when another process holds their core),
    /// the next sections run on the caller alone.
    #[test]
    fn stalled_workers_send_sections_inline() {
        let governor = Governor::with_backoff(GovernorMode::Adaptive, Duration::from_secs(5));
        let pool = Pool::with_governor(2, governor);
        let caller = std::thread::current().id();
        let stalls = AtomicUsize::new(0);
        let section = || {
            pool.run(8, |_| {
                if std::thread::current().id() != caller {
                    stalls.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(3));
                } else {
                    let t = Instant::now();
                    while t.elapsed() < us(20) {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        // Workers may not wake in time on a busy machine, and a caller descheduled during its own
        // share hides a stall: run sections until the governor has seen enough.
        for _ in 0..2000 {
            section();
            if pool.governor().is_inline(Instant::now()) {
                break;
            }
        }
        let g = pool.governor();
        assert!(g.is_inline(Instant::now()), "{g:?}");
        let before = stalls.load(Ordering::Relaxed);
        assert!(before > 0);
        // Within the back-off no worker gets another chunk.
        for _ in 0..10 {
            section();
        }
        assert_eq!(stalls.load(Ordering::Relaxed), before);
        assert!(pool.governor().inline_sections >= 10);
    }
}
