//! Continuous batching: requests wait in a bounded queue, take a free slot of the
//! model's cache (the one whose previous sequence shares the longest prefix with the
//! prompt, so a client's next keystroke reuses what its last request computed, unless
//! what it shares is short beside the rest), are prefilled there (those waiting together
//! in one batch, so the last of a burst does not wait for each other's prefill in turn),
//! and then advance one token per step together with every other active request. A
//! cancelled request (its client went away, or its text hit a stop) leaves at the next
//! step; the others are not disturbed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use crate::{Model, Prefill, Sampling, StepRow};

/// What [`Job::cancel`] says: the request goes on, its text is complete (a stop string,
/// a time limit), or its client went away.
pub const GO_ON: u8 = 0;
pub const COMPLETE: u8 = 1;
pub const GONE: u8 = 2;

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// New tokens at most (0: only compute the prompt into the cache).
    pub max_tokens: usize,
    /// Tokens that end the sequence (not part of it).
    pub stop_tokens: Vec<u32>,
    /// The ids the first new token must be one of (token healing: the prompt's last
    /// token was taken off); None: any.
    pub first_tokens: Option<Vec<u32>>,
    /// [`GO_ON`], [`COMPLETE`] or [`GONE`], set by the request's connection.
    pub cancel: Arc<AtomicU8>,
    pub events: Sender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
    /// Its connection said so ([`COMPLETE`] or [`GONE`]).
    Cancelled,
}

#[derive(Debug)]
pub enum Event {
    /// The prompt is in the cache: how many of its tokens were there already, and how
    /// long it waited and took.
    Prefilled {
        slot: usize,
        cached: usize,
        queued_ms: f64,
        prompt_ms: f64,
    },
    Token(u32),
    Finished(Finish),
    Failed(String),
}

/// Counters shown by `/health`.
#[derive(Debug, Default)]
pub struct Counters {
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub active: AtomicUsize,
}

/// Counts a request that ended: cancelled if its client went away, else finished.
fn count_end(cancel: &AtomicU8, counters: &Counters) {
    let counter = if cancel.load(Ordering::SeqCst) == GONE {
        &counters.cancelled
    } else {
        &counters.finished
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The submitting side of the engine.
pub struct Engine {
    jobs: Sender<Job>,
    /// Joined when the engine is dropped: a process that ends while the thread still
    /// loads the model or captures its graphs would tear CUDA down under it (an abort).
    thread: Option<std::thread::JoinHandle<()>>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    pub slots: usize,
    pub counters: Arc<Counters>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are waiting (the most it queues); retry later")]
    Busy(usize),
    #[error("the model has stopped")]
    Stopped,
}

impl Engine {
    /// Starts the engine thread; `load` makes the model on it (a model need not be
    /// `Send`: CUDA graphs belong to their thread). `ready` is set once it is loaded.
    pub fn start<M: Model + 'static>(
        load: impl FnOnce() -> Result<M, String> + Send + 'static,
        slots: usize,
        max_waiting: usize,
        ready: Arc<AtomicBool>,
    ) -> Result<Engine, String> {
        let (jobs, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let (w, c) = (waiting.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("cxxlm-engine".into())
            .spawn(move || match load() {
                Ok(model) => {
                    ready.store(true, Ordering::SeqCst);
                    run(model, rx, w, c)
                }
                Err(e) => {
                    eprintln!("error: loading the model: {e}");
                    std::process::exit(1);
                }
            })
            .map_err(|e| format!("starting the engine thread: {e}"))?;
        Ok(Engine {
            jobs,
            thread: Some(thread),
            waiting,
            max_waiting,
            slots,
            counters,
        })
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::Busy(before));
        }
        self.jobs.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The thread ends once no sender is left and its jobs are done.
        self.jobs = mpsc::channel().0;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Active {
    job: Job,
    /// The sampled token not yet fed to the model.
    next: u32,
    generated: usize,
}

struct Slot {
    /// Tokens whose keys and values the slot's cache holds, from position 0.
    cached: Vec<u32>,
    active: Option<Active>,
    last_used: u64,
}

/// Prompt tokens computed in one prefill of waiting requests, padded to the longest, at
/// the most (a request longer than that is prefilled alone).
const PREFILL_TOKENS: usize = 16_384;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How much of a cached prefix of `shared` tokens a prompt of `len` reuses: all of it, or
/// none when it is short beside what is left to compute. A prompt continued after cached
/// positions attends through an explicit mask, which rules out flash attention; from
/// position 0 it attends causally. Two unrelated FIM prompts share their first specials.
fn reused(shared: usize, len: usize) -> usize {
    match shared * 4 >= len - shared {
        true => shared,
        false => 0,
    }
}

fn run<M: Model>(
    mut model: M,
    rx: Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    counters: Arc<Counters>,
) {
    let context = model.context();
    let mut slots: Vec<Slot> = (0..model.slots())
        .map(|_| Slot {
            cached: Vec::new(),
            active: None,
            last_used: 0,
        })
        .collect();
    let mut queue: VecDeque<(Job, Instant)> = VecDeque::new();
    let mut clock = 0u64;
    let finish = |slot: &mut Slot, how: Finish, counters: &Counters| {
        if let Some(a) = slot.active.take() {
            let _ = a.job.events.send(Event::Finished(how));
            count_end(&a.job.cancel, counters);
            counters.active.fetch_sub(1, Ordering::Relaxed);
        }
    };
    loop {
        let busy = slots.iter().any(|s| s.active.is_some());
        if !busy && queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back((job, Instant::now())),
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            queue.push_back((job, Instant::now()));
        }
        queue.retain(|(job, _)| {
            // Its connection ended it (gone, or done) before it had a slot.
            let ended = job.cancel.load(Ordering::SeqCst) != GO_ON;
            if ended {
                waiting.fetch_sub(1, Ordering::SeqCst);
                count_end(&job.cancel, &counters);
                let _ = job.events.send(Event::Finished(Finish::Cancelled));
            }
            !ended
        });
        for slot in &mut slots {
            if slot
                .active
                .as_ref()
                .is_some_and(|a| a.job.cancel.load(Ordering::SeqCst) != GO_ON)
            {
                finish(slot, Finish::Cancelled, &counters);
            }
        }
        // Waiting requests take free slots, reusing the longest cached prefix, and are
        // prefilled together, up to PREFILL_TOKENS padded (the decoding of the others
        // waits no longer than that between two steps).
        let mut admitted: Vec<(usize, usize, Job, Instant)> = Vec::new();
        let mut longest_admitted = 0;
        loop {
            let free: Vec<usize> = (0..slots.len())
                .filter(|&i| slots[i].active.is_none() && admitted.iter().all(|a| a.0 != i))
                .collect();
            if free.is_empty() {
                break;
            }
            let Some((job, queued)) = queue.pop_front() else {
                break;
            };
            waiting.fetch_sub(1, Ordering::SeqCst);
            let index = free
                .iter()
                .copied()
                .max_by_key(|&i| {
                    (
                        common_prefix(&slots[i].cached, &job.prompt),
                        u64::MAX - slots[i].last_used,
                    )
                })
                .expect("a free slot");
            let slot = &mut slots[index];
            let shared = common_prefix(&slot.cached, &job.prompt).min(job.prompt.len() - 1);
            let keep = reused(shared, job.prompt.len());
            // Prompts of a batch are padded to its longest.
            let longest = longest_admitted.max(job.prompt.len() - keep);
            if !admitted.is_empty() && (admitted.len() + 1) * longest > PREFILL_TOKENS {
                waiting.fetch_add(1, Ordering::SeqCst);
                queue.push_front((job, queued));
                break;
            }
            clock += 1;
            slot.last_used = clock;
            slot.cached.truncate(keep);
            admitted.push((index, keep, job, queued));
            longest_admitted = longest;
        }
        if !admitted.is_empty() {
            let started = Instant::now();
            let prompts: Vec<Prefill> = admitted
                .iter()
                .map(|(slot, keep, job, _)| Prefill {
                    slot: *slot,
                    from: *keep,
                    prompt: &job.prompt,
                    sampling: &job.sampling,
                    first: job.first_tokens.as_deref(),
                })
                .collect();
            let firsts = model.prefill(&prompts);
            let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
            for ((index, keep, job, queued), first) in admitted.into_iter().zip(firsts) {
                let slot = &mut slots[index];
                let first = match first {
                    Ok(t) => t,
                    Err(e) => {
                        slot.cached.clear();
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = job.events.send(Event::Failed(e));
                        continue;
                    }
                };
                slot.cached.extend_from_slice(&job.prompt[keep..]);
                counters
                    .prompt_tokens
                    .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
                counters
                    .cached_tokens
                    .fetch_add(keep as u64, Ordering::Relaxed);
                let _ = job.events.send(Event::Prefilled {
                    slot: index,
                    cached: keep,
                    queued_ms: started.duration_since(queued).as_secs_f64() * 1e3,
                    prompt_ms,
                });
                counters.active.fetch_add(1, Ordering::Relaxed);
                slot.active = Some(Active {
                    job,
                    next: first,
                    generated: 0,
                });
                take_token(slot, context, &counters, &finish);
            }
        }
        let rows: Vec<StepRow> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.active.as_ref().map(|a| {
                    let mut recent = a.job.sampling.recent(&s.cached).to_vec();
                    if a.job.sampling.repeat_penalty != 1.0 {
                        recent.push(a.next);
                    }
                    StepRow {
                        slot: i,
                        token: a.next,
                        position: s.cached.len(),
                        sampling: a.job.sampling.clone(),
                        recent,
                    }
                })
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        match model.step(&rows) {
            Ok(next) => {
                for (row, token) in rows.iter().zip(next) {
                    let slot = &mut slots[row.slot];
                    slot.cached.push(row.token);
                    if let Some(a) = &mut slot.active {
                        a.next = token;
                    }
                    take_token(slot, context, &counters, &finish);
                }
            }
            Err(e) => {
                for row in &rows {
                    let slot = &mut slots[row.slot];
                    slot.cached.clear();
                    if let Some(a) = slot.active.take() {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        counters.active.fetch_sub(1, Ordering::Relaxed);
                        let _ = a.job.events.send(Event::Failed(e.clone()));
                    }
                }
            }
        }
    }
}

/// Hands the slot's sampled token to its request, or ends the request.
fn take_token(
    slot: &mut Slot,
    context: usize,
    counters: &Counters,
    finish: &dyn Fn(&mut Slot, Finish, &Counters),
) {
    let Some(a) = &mut slot.active else {
        return;
    };
    if a.generated >= a.job.max_tokens {
        return finish(slot, Finish::Length, counters);
    }
    if a.job.stop_tokens.contains(&a.next) {
        return finish(slot, Finish::Stop, counters);
    }
    a.generated += 1;
    counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
    if a.job.events.send(Event::Token(a.next)).is_err() {
        // The connection let go of the request: gone, unless it had all it wanted (a stop
        // string or a line limit met while this token was made).
        let _ = a
            .job
            .cancel
            .compare_exchange(GO_ON, GONE, Ordering::SeqCst, Ordering::SeqCst);
        return finish(slot, Finish::Cancelled, counters);
    }
    // The token just sent is fed at position `cached.len()`, which must fit.
    if a.generated >= a.job.max_tokens || slot.cached.len() >= context {
        finish(slot, Finish::Length, counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A model that writes token 7 and records the prompt lengths of each prefill.
    struct Recording {
        prefills: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    impl Model for Recording {
        fn slots(&self) -> usize {
            4
        }
        fn context(&self) -> usize {
            1 << 20
        }
        fn prefill(&mut self, prompts: &[Prefill]) -> Vec<Result<u32, String>> {
            let lengths = prompts.iter().map(|p| p.prompt.len() - p.from).collect();
            self.prefills.lock().unwrap().push(lengths);
            prompts.iter().map(|_| Ok(7)).collect()
        }
        fn step(&mut self, rows: &[StepRow]) -> Result<Vec<u32>, String> {
            Ok(vec![7; rows.len()])
        }
    }

    /// The prefills the engine asks for when requests of `lengths` arrive together.
    fn prefills_of(lengths: &[usize]) -> Vec<Vec<usize>> {
        let prefills = Arc::new(Mutex::new(Vec::new()));
        let (go, wait) = mpsc::channel::<()>();
        let model = Recording {
            prefills: prefills.clone(),
        };
        // The model is ready only once every request is queued.
        let load = move || {
            wait.recv().map_err(|e| e.to_string())?;
            Ok(model)
        };
        let engine = Engine::start(load, 4, 16, Arc::new(AtomicBool::new(false))).unwrap();
        let mut ends = Vec::new();
        for (i, &n) in lengths.iter().enumerate() {
            let (events, end) = mpsc::channel();
            let job = Job {
                prompt: (0..n as u32).map(|t| t + 1000 * i as u32).collect(),
                sampling: Sampling {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    repeat_penalty: 1.0,
                    repeat_last_n: 64,
                },
                max_tokens: 2,
                stop_tokens: Vec::new(),
                first_tokens: None,
                cancel: Arc::new(AtomicU8::new(GO_ON)),
                events,
            };
            engine.submit(job).unwrap();
            ends.push(end);
        }
        go.send(()).unwrap();
        for end in ends {
            while !matches!(end.recv().unwrap(), Event::Finished(_)) {}
        }
        let got = prefills.lock().unwrap().clone();
        got
    }

    #[test]
    fn requests_that_wait_together_are_prefilled_together() {
        assert_eq!(prefills_of(&[30, 5, 12]), vec![vec![30, 5, 12]]);
        // Up to PREFILL_TOKENS at once, padded to the longest; a longer request alone.
        let long = PREFILL_TOKENS / 2;
        assert_eq!(
            prefills_of(&[long, 20, long + 1, 20_000, 7]),
            vec![vec![long, 20], vec![long + 1], vec![20_000], vec![7]]
        );
    }

    #[test]
    fn dropping_the_engine_waits_for_its_thread() {
        let prefills = Arc::new(Mutex::new(Vec::new()));
        let model = Recording {
            prefills: prefills.clone(),
        };
        // Still loading when the engine is dropped, as when there is nothing left to do.
        let load = move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            Ok(model)
        };
        let engine = Engine::start(load, 4, 16, Arc::new(AtomicBool::new(false))).unwrap();
        drop(engine);
        // The thread has ended: it no longer holds the model.
        assert_eq!(Arc::strong_count(&prefills), 1);
    }

    #[test]
    fn a_short_shared_prefix_is_computed_again() {
        // The next keystroke reuses what it shares; an unrelated prompt does not.
        assert_eq!(reused(1990, 2000), 1990);
        assert_eq!(reused(2, 2000), 0);
        assert_eq!(reused(0, 10), 0);
        // Up to a fifth of the prompt is computed again.
        assert_eq!(reused(400, 2000), 400);
        assert_eq!(reused(399, 2000), 0);
        assert_eq!(reused(9, 10), 9);
    }
}
