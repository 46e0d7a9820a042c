//! In-process wrappers around the real adapters, for faults the real
//! services cannot produce on demand: a step that never returns (the worker
//! died there), a renewal that fails, a write that waits for a signal. They
//! delegate everything else to the real PostgreSQL, Redis and Docker.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::{self, BoxStream};
use rtmanager::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, OutcomeEvent, RuntimeRecord, Step,
};
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::redis_lease::RedisLeases;
use rtmanager::ports::{
    Acquired, ContainerEngine, ContainerInfo, EngineError, Fence, FenceView, InboxClaim,
    LeaseError, LeaseHolder, LeaseStore, OperationWrite, Peeked, Progress, Recorded, RuntimeStore,
    StoreError,
};
use rtmanager::ports::{EngineEvent, ManagedContainer};
use tokio::sync::Notify;
use uuid::Uuid;

/// Decides, per write, whether the store stalls before committing it.
pub type WritePredicate = Arc<dyn Fn(&OperationWrite) -> bool + Send + Sync>;

/// A store whose matching `append` stalls until `release` is notified
/// (forever if never): the worker "dies" or "pauses" right before that write.
#[derive(Clone)]
pub struct StallingStore {
    pub inner: PgStore,
    pub stall_if: WritePredicate,
    pub stalled: Arc<Notify>,
    pub release: Arc<Notify>,
}

impl StallingStore {
    pub fn new(
        inner: PgStore,
        stall_if: impl Fn(&OperationWrite) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            stall_if: Arc::new(stall_if),
            stalled: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }
}

impl RuntimeStore for StallingStore {
    fn lookup(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<InboxClaim, StoreError>> + Send {
        self.inner.lookup(request)
    }
    fn claim(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<InboxClaim, StoreError>> + Send {
        self.inner.claim(request)
    }
    fn load(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<RuntimeRecord>, StoreError>> + Send {
        self.inner.load(game_id)
    }
    fn peek(
        &self,
        game_id: &GameId,
        command_id: &str,
    ) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        self.inner.peek(game_id, command_id)
    }
    fn advance_fence(
        &self,
        game_id: &GameId,
        command_id: &str,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send {
        self.inner.advance_fence(game_id, command_id)
    }
    fn observe_fence(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<FenceView, StoreError>> + Send {
        self.inner.observe_fence(game_id)
    }
    async fn append(&self, write: OperationWrite, event_id: Uuid) -> Result<Recorded, StoreError> {
        if (self.stall_if)(&write) {
            self.stalled.notify_one();
            self.release.notified().await;
        }
        self.inner.append(write, event_id).await
    }
    fn append_rejected(
        &self,
        event: &OutcomeEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.append_rejected(event)
    }
    fn progress(
        &self,
        command_id: &str,
    ) -> impl Future<Output = Result<Progress, StoreError>> + Send {
        self.inner.progress(command_id)
    }
    fn journal(
        &self,
        game_id: &GameId,
        fence: Fence,
        command_id: &str,
        step: &Step,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.journal(game_id, fence, command_id, step)
    }
    fn republish(&self, event_id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.republish(event_id)
    }
    fn records_in(
        &self,
        status: rtmanager::domain::RuntimeStatus,
    ) -> impl Future<Output = Result<Vec<RuntimeRecord>, StoreError>> + Send {
        self.inner.records_in(status)
    }
    fn last_exit(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<OutcomeEvent>, StoreError>> + Send {
        RuntimeStore::last_exit(&self.inner, game_id)
    }
    fn auto_restarts_since(
        &self,
        game_id: &GameId,
        since: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send {
        self.inner.auto_restarts_since(game_id, since)
    }
}

/// An engine whose `stop`, `start`, `rename` or `create` (under either
/// name) never returns once armed (or whose `create` panics, with
/// `panic_on_create`): the worker died in the middle of that Docker call
/// (`hang_before_rename`: before the rename reached Docker). Also: a create whose answer is
/// lost once (`lose_create_answer`: Docker made the container, the call
/// timed out), and a Docker that cannot be reached for stops
/// (`stop_unavailable`, counting the calls in `stop_calls`). And an event
/// stream that breaks (`break_events`: every open stream fails, as when the
/// engine restarts) and cannot be had while `events_down` is set (each
/// subscription fails at once), counting subscriptions in `subscriptions`.
#[derive(Clone)]
pub struct HangingEngine {
    pub inner: DockerEngine,
    pub hang_stop: Arc<AtomicBool>,
    pub hang_start: Arc<AtomicBool>,
    pub hang_create: Arc<AtomicBool>,
    pub hang_rename: Arc<AtomicBool>,
    pub hang_before_rename: Arc<AtomicBool>,
    pub panic_on_create: Arc<AtomicBool>,
    pub lose_create_answer: Arc<AtomicBool>,
    pub stop_unavailable: Arc<AtomicBool>,
    pub stop_calls: Arc<AtomicU32>,
    pub reached: Arc<Notify>,
    pub break_events: Arc<Notify>,
    pub events_down: Arc<AtomicBool>,
    pub subscriptions: Arc<AtomicU32>,
}

impl HangingEngine {
    pub fn new(inner: DockerEngine) -> Self {
        Self {
            inner,
            hang_stop: Arc::default(),
            hang_start: Arc::default(),
            hang_create: Arc::default(),
            hang_rename: Arc::default(),
            hang_before_rename: Arc::default(),
            panic_on_create: Arc::default(),
            lose_create_answer: Arc::default(),
            stop_unavailable: Arc::default(),
            stop_calls: Arc::default(),
            reached: Arc::new(Notify::new()),
            break_events: Arc::new(Notify::new()),
            events_down: Arc::default(),
            subscriptions: Arc::default(),
        }
    }
}

impl ContainerEngine for HangingEngine {
    fn image_present(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<bool, EngineError>> + Send {
        self.inner.image_present(image)
    }
    fn pull(&self, image: &ImageRef) -> impl Future<Output = Result<(), EngineError>> + Send {
        self.inner.pull(image)
    }
    fn inspect(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, EngineError>> + Send {
        self.inner.inspect(game_id)
    }
    async fn create(&self, game_id: &GameId, image: &ImageRef) -> Result<ContainerId, EngineError> {
        if self.panic_on_create.load(Ordering::SeqCst) {
            panic!("injected: the engine adapter panicked");
        }
        if self.hang_create.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        let created = self.inner.create(game_id, image).await;
        if created.is_ok() && self.lose_create_answer.swap(false, Ordering::SeqCst) {
            return Err(EngineError::Unavailable(
                "injected: the create timed out after Docker made the container".into(),
            ));
        }
        created
    }
    async fn create_next(
        &self,
        game_id: &GameId,
        image: &ImageRef,
    ) -> Result<ContainerId, EngineError> {
        if self.hang_create.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        let created = self.inner.create_next(game_id, image).await;
        if created.is_ok() && self.lose_create_answer.swap(false, Ordering::SeqCst) {
            return Err(EngineError::Unavailable(
                "injected: the create timed out after Docker made the container".into(),
            ));
        }
        created
    }
    fn inspect_next(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, EngineError>> + Send {
        self.inner.inspect_next(game_id)
    }
    async fn rename_to_game(&self, id: &ContainerId, game_id: &GameId) -> Result<(), EngineError> {
        if self.hang_before_rename.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        // With `hang_rename`, the container really is renamed; the call
        // just never reports back.
        let result = self.inner.rename_to_game(id, game_id).await;
        if self.hang_rename.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        result
    }
    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        // The container really starts; the call just never reports back.
        let result = self.inner.start(id).await;
        if self.hang_start.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        result
    }
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), EngineError> {
        self.stop_calls.fetch_add(1, Ordering::SeqCst);
        if self.stop_unavailable.load(Ordering::SeqCst) {
            return Err(EngineError::Unavailable(
                "injected: Docker is unreachable".into(),
            ));
        }
        if self.hang_stop.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.stop(id, grace).await
    }
    fn remove(&self, id: &ContainerId) -> impl Future<Output = Result<(), EngineError>> + Send {
        self.inner.remove(id)
    }
    fn logs_tail(
        &self,
        id: &ContainerId,
        lines: usize,
    ) -> impl Future<Output = Result<String, EngineError>> + Send {
        self.inner.logs_tail(id, lines)
    }
    fn state_dir(&self, game_id: &GameId) -> PathBuf {
        self.inner.state_dir(game_id)
    }
    fn managed_containers(
        &self,
    ) -> impl Future<Output = Result<Vec<ManagedContainer>, EngineError>> + Send {
        self.inner.managed_containers()
    }
    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        let failed = |why: &'static str| {
            stream::once(async move { Err(EngineError::Unavailable(why.into())) })
        };
        if self.events_down.load(Ordering::SeqCst) {
            return failed("injected: the engine's event stream is down").boxed();
        }
        let broken = self.break_events.clone();
        self.inner
            .events()
            .take_until(async move { broken.notified().await })
            .chain(failed("injected: the engine's event stream broke"))
            .boxed()
    }
}

/// Real leases with faults to switch on: renewals that fail
/// (`fail_renewals`: a Redis outage or a paused worker, as far as the holder
/// can tell), acquisitions that fail (`down`: Redis unreachable from this
/// worker), and a next acquisition that first waits for `release`
/// (`slow_next_acquire`: the attempt was slow to ask while another copy of
/// its command went ahead; `waiting` fires when it starts waiting).
#[derive(Clone)]
pub struct FlakyLeases {
    pub inner: RedisLeases,
    pub fail_renewals: Arc<AtomicBool>,
    pub down: Arc<AtomicBool>,
    pub slow_next_acquire: Arc<AtomicBool>,
    pub waiting: Arc<Notify>,
    pub release: Arc<Notify>,
}

impl FlakyLeases {
    pub fn new(inner: RedisLeases) -> Self {
        Self {
            inner,
            fail_renewals: Arc::default(),
            down: Arc::default(),
            slow_next_acquire: Arc::default(),
            waiting: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }
}

impl LeaseStore for FlakyLeases {
    async fn acquire(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Acquired, LeaseError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LeaseError(
                "injected: the lease store is unreachable".into(),
            ));
        }
        if self.slow_next_acquire.swap(false, Ordering::SeqCst) {
            self.waiting.notify_one();
            self.release.notified().await;
        }
        self.inner.acquire(game_id, holder, ttl).await
    }
    async fn renew(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, LeaseError> {
        if self.fail_renewals.load(Ordering::SeqCst) {
            return Err(LeaseError("injected: renewal failed".into()));
        }
        self.inner.renew(game_id, holder, ttl).await
    }
    fn release(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send {
        self.inner.release(game_id, holder)
    }
}
