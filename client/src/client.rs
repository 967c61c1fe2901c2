//! The async SphereDB client: routing cache, leader discovery, bounded retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spheredb_storage::keys::{self, Keyspace};
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;
use crate::limits::{self, check_key, check_value};
use crate::proto::v1::{
    admin_client::AdminClient, feed_client::FeedClient, kv_client::KvClient, txn_client::TxnClient,
    BatchRequest, CompareAndSwapRequest, DecommissionRequest, DeleteRequest, GetRequest,
    GetTimestampsRequest, Header, KeyValue, Keyspace as WireKeyspace, MergeRequest, PutRequest,
    RangeDescriptor, RangeListRequest, RangeListResponse, RangeRef, ReadConsistency, ScanRequest,
    SplitRequest, SplitResponse, StatusRequest, StatusResponse, WriteOp,
};

/// Default time budget of one client call, retries included.
pub const DEFAULT_CALL_DEADLINE_MS: u64 = 10_000;
/// Longest a merge may take, moving the right-hand range's replicas included.
pub const MERGE_DEADLINE_MS: u64 = 120_000;
/// Default most attempts of one client call.
pub const DEFAULT_RETRY_BUDGET: u32 = 16;
/// Default HTTP/2 connections the client opens to each node.
pub const DEFAULT_CONNECTIONS_PER_NODE: usize = 4;
/// Most HTTP/2 connections the client opens to one node.
pub const MAX_CONNECTIONS_PER_NODE: usize = 64;
/// Period of the HTTP/2 pings on a connection with calls in flight.
pub const KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// A connection whose ping is not answered within this is closed (its calls fail over).
pub const KEEPALIVE_TIMEOUT_MS: u64 = 5_000;
/// First backoff between attempts; doubles up to [`MAX_BACKOFF_MS`].
pub const INITIAL_BACKOFF_MS: u64 = 20;
/// Longest backoff between attempts.
pub const MAX_BACKOFF_MS: u64 = 500;
/// Longest one read attempt waits before trying another node (a paused or partitioned
/// node never answers; writes wait out the whole deadline since their outcome would be
/// unknown anyway).
pub const READ_ATTEMPT_TIMEOUT_MS: u64 = 2_000;
/// Time allowed to open a connection.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time budget of one call including retries.
    pub call_deadline_ms: u64,
    /// Most attempts of one call.
    pub retry_budget: u32,
    /// Read consistency of gets and scans.
    pub consistency: Consistency,
    /// HTTP/2 connections to each node, taken in turn by successive calls (1 to
    /// [`MAX_CONNECTIONS_PER_NODE`]). One connection carries every concurrent call as its
    /// own stream, but both ends frame all of them in one task behind one lock; several
    /// spread a busy client's calls over the server's cores.
    pub connections_per_node: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_deadline_ms: DEFAULT_CALL_DEADLINE_MS,
            retry_budget: DEFAULT_RETRY_BUDGET,
            consistency: Consistency::Linearizable,
            connections_per_node: DEFAULT_CONNECTIONS_PER_NODE,
        }
    }
}

/// How reads are made linearizable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// ReadIndex: one quorum round trip per read batch.
    Linearizable,
    /// The leader's lease. Served with ReadIndex until leases are safe across follower
    /// restarts (see docs/architecture.md, "Reads and writes").
    Lease,
}

impl Consistency {
    fn wire(self) -> i32 {
        match self {
            Consistency::Linearizable => ReadConsistency::Linearizable as i32,
            Consistency::Lease => ReadConsistency::Lease as i32,
        }
    }
}

/// What the client knows about the cluster. Fixed from server hints.
#[derive(Default)]
struct RoutingCache {
    /// Descriptors keyed by start key.
    ranges: BTreeMap<Vec<u8>, RangeDescriptor>,
    /// Node id to address.
    nodes: HashMap<u64, String>,
    /// Range id to the node believed to lead it.
    leaders: HashMap<u64, u64>,
}

impl RoutingCache {
    fn lookup(&self, key: &[u8]) -> Option<RangeDescriptor> {
        let (_, desc) = self.ranges.range(..=key.to_vec()).next_back()?;
        keys::span_contains(&desc.start_key, &desc.end_key, key).then(|| desc.clone())
    }

    fn install(&mut self, descriptors: &[RangeDescriptor]) {
        for d in descriptors {
            // A descriptor older than a cached one it overlaps comes from a stale replica
            // (a parent that has not applied its split, a removed replica): ignore it.
            // Splits and merges raise the generation of every range they produce above
            // that of the ranges they replace, so the newer view always wins.
            let newer_cached = self
                .ranges
                .values()
                .any(|old| spans_overlap(old, d) && old.generation > d.generation);
            if newer_cached {
                continue;
            }
            // Drop cached ranges the new descriptor overlaps, then insert it.
            let stale: Vec<Vec<u8>> = self
                .ranges
                .values()
                .filter(|old| spans_overlap(old, d))
                .map(|old| old.start_key.clone())
                .collect();
            for k in stale {
                self.ranges.remove(&k);
            }
            self.ranges.insert(d.start_key.clone(), d.clone());
        }
    }
}

fn spans_overlap(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    keys::spans_overlap(&a.start_key, &a.end_key, &b.start_key, &b.end_key)
}

/// A SphereDB client. Cheap to clone; clones share connections and the routing cache.
#[derive(Clone)]
pub struct Client {
    seeds: Arc<Vec<String>>,
    options: ClientOptions,
    cache: Arc<Mutex<RoutingCache>>,
    /// Each node's connections.
    channels: Arc<Mutex<HashMap<String, NodeConnections>>>,
    /// Callers waiting for a timestamp (see [`Client::timestamp`]).
    timestamps: Arc<Mutex<TimestampWaiters>>,
    /// The newest oracle timestamp this client has seen (handed to it, or read at), sent
    /// with every request (`Header.causal_ts`): a write commits above it, so a write that
    /// follows a timestamp in this client's order is never visible at that timestamp.
    causal_ts: Arc<AtomicU64>,
}

/// Should the sending task end early (a panic, its runtime shutting down), the callers still
/// waiting get an error instead of waiting in vain, and the next caller starts a new task.
struct TimestampSenderGuard {
    waiters: Arc<Mutex<TimestampWaiters>>,
    finished: bool,
}

impl Drop for TimestampSenderGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.in_flight = false;
        for waiter in w.waiting.drain(..) {
            let _ = waiter.send(Err(ClientError::Unavailable(
                "the timestamp sender stopped; retry".into(),
            )));
        }
    }
}

/// Callers waiting for a timestamp, served together by the next `GetTimestamps` call.
#[derive(Default)]
struct TimestampWaiters {
    /// At most [`limits::MAX_TIMESTAMPS_PER_CALL`] are served per call; the rest wait for
    /// the next.
    waiting: Vec<tokio::sync::oneshot::Sender<Result<u64, ClientError>>>,
    /// A task is sending calls until no caller waits.
    in_flight: bool,
    /// The node that last handed out timestamps (the meta-range leader), asked first.
    oracle_addr: Option<String>,
}

/// The connections to one node, and whose turn is next.
struct NodeConnections {
    pool: Vec<Channel>,
    next: usize,
}

/// Whether a call may be sent again after an outcome-unknown failure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads: any failure may be retried.
    Always,
    /// Writes: retried only when the server guarantees it did not apply the request.
    OnlyIfNotApplied,
}

impl Client {
    /// Connects to a cluster through any of `seeds` (`host:port`) and loads the range map.
    pub async fn connect<S: AsRef<str>>(
        seeds: &[S],
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument("no seed address given".into()));
        }
        if !(1..=MAX_CONNECTIONS_PER_NODE).contains(&options.connections_per_node) {
            return Err(ClientError::InvalidArgument(format!(
                "connections per node must be 1 to {MAX_CONNECTIONS_PER_NODE}, not {}",
                options.connections_per_node
            )));
        }
        let client = Client {
            seeds: Arc::new(seeds.iter().map(|s| s.as_ref().to_string()).collect()),
            options,
            cache: Arc::new(Mutex::new(RoutingCache::default())),
            channels: Arc::new(Mutex::new(HashMap::new())),
            timestamps: Arc::default(),
            causal_ts: Arc::default(),
        };
        client.refresh_ranges().await?;
        Ok(client)
    }

    /// The range this client's map has holding `key` (encoded), if any.
    pub(crate) fn cached_range(&self, key: &[u8]) -> Option<RangeDescriptor> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lookup(key)
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = channels.get_mut(addr) {
            let ch = node.pool[node.next % node.pool.len()].clone();
            node.next = node.next.wrapping_add(1);
            return Ok(ch);
        }
        let node = match channels.entry(addr.to_string()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| {
                        ClientError::InvalidArgument(format!("bad address {addr:?}: {e}"))
                    })?
                    .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
                    .tcp_nodelay(true)
                    // A connection whose peer vanished (a partition, a dead host) is found
                    // out by its pings instead of hanging every call on it to the deadline.
                    .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
                    .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS));
                // Lazy channels connect on first use and reconnect by themselves.
                e.insert(NodeConnections {
                    pool: (0..self.options.connections_per_node)
                        .map(|_| endpoint.connect_lazy())
                        .collect(),
                    next: 0,
                })
            }
        };
        let ch = node.pool[node.next % node.pool.len()].clone();
        node.next = node.next.wrapping_add(1);
        Ok(ch)
    }

    fn kv(&self, addr: &str) -> Result<KvClient<Channel>, ClientError> {
        Ok(KvClient::new(self.channel(addr)?)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES))
    }

    /// Admin stub for `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    /// Calls an admin RPC on the first node that answers, starting with `preferred`, then the
    /// seeds and known nodes, following `NotLeader` hints.
    async fn admin_call<T, F, Fut>(&self, preferred: Vec<String>, call: F) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.admin_call_within(self.options.call_deadline_ms, preferred, call)
            .await
    }

    /// [`Client::admin_call`] with `deadline_ms` per attempt.
    async fn admin_call_within<T, F, Fut>(
        &self,
        deadline_ms: u64,
        preferred: Vec<String>,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let answer = self
            .cluster_call_within(deadline_ms, preferred, |ch| call(AdminClient::new(ch)))
            .await?;
        Ok(answer.0)
    }

    /// Calls an RPC (`call` builds it on a node's channel) on the first node that answers,
    /// starting with `preferred`, then the seeds and known nodes, following `NotLeader`
    /// hints; returns the answer and the address that gave it.
    async fn cluster_call_within<T, F, Fut>(
        &self,
        deadline_ms: u64,
        preferred: Vec<String>,
        call: F,
    ) -> Result<(T, String), ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut candidates = preferred;
        candidates.extend(self.seeds.iter().cloned());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut known: Vec<(&u64, &String)> = cache.nodes.iter().collect();
            known.sort();
            candidates.extend(known.into_iter().map(|(_, a)| a.clone()));
        }
        let mut tried: Vec<String> = Vec::new();
        let mut last_error = ClientError::Unavailable("no node answered".into());
        while let Some(addr) = candidates.iter().find(|c| !tried.contains(c)).cloned() {
            if tried.len() as u32 >= self.options.retry_budget {
                break;
            }
            tried.push(addr.clone());
            let attempt = tokio::time::timeout(
                Duration::from_millis(deadline_ms),
                call(self.channel(&addr)?),
            )
            .await;
            match attempt {
                Ok(Ok(resp)) => return Ok((resp.into_inner(), addr)),
                Ok(Err(status)) => {
                    let e = ClientError::from_status(&status);
                    if let ClientError::NotLeader { leader: Some(l) } = &e {
                        self.cache
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .nodes
                            .insert(l.node_id, l.addr.clone());
                        if !tried.contains(&l.addr) {
                            candidates.insert(0, l.addr.clone());
                        }
                    }
                    if matches!(e, ClientError::InvalidArgument(_)) {
                        return Err(e);
                    }
                    // A leader's own error says more than another node's redirect to it.
                    let redirect = matches!(e, ClientError::NotLeader { .. });
                    if !redirect
                        || matches!(
                            last_error,
                            ClientError::NotLeader { .. } | ClientError::Unavailable(_)
                        )
                    {
                        last_error = e;
                    }
                }
                Err(_) => last_error = ClientError::Unavailable(format!("{addr} did not answer")),
            }
        }
        Err(last_error)
    }

    /// A timestamp from the cluster's oracle, above every timestamp it handed out before
    /// this call began. Callers share calls: the callers waiting while one `GetTimestamps`
    /// call is out are served together by the next, each with its own timestamp.
    pub async fn timestamp(&self) -> Result<u64, ClientError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_sender = {
            let mut w = self.timestamps.lock().unwrap_or_else(|p| p.into_inner());
            w.waiting.push(tx);
            !std::mem::replace(&mut w.in_flight, true)
        };
        if start_sender {
            // A task of its own, not this caller's future: a caller that gives up must not
            // strand the others.
            tokio::spawn(self.clone().send_timestamp_calls());
        }
        // A caller waits for the call out now and the next one, each bounded by the retry
        // budget's attempts.
        let attempts = u64::from(self.options.retry_budget.max(1));
        let wait_ms = 2 * attempts * self.options.call_deadline_ms;
        match tokio::time::timeout(Duration::from_millis(wait_ms), rx).await {
            Ok(Ok(answer)) => {
                if let Ok(ts) = &answer {
                    self.causal_ts.fetch_max(*ts, Ordering::Relaxed);
                }
                answer
            }
            Ok(Err(_)) => Err(ClientError::Unavailable(
                "the timestamp request was dropped".into(),
            )),
            Err(_) => Err(ClientError::Unavailable(format!(
                "no timestamp within {wait_ms} ms"
            ))),
        }
    }

    /// Sends `GetTimestamps` calls until no caller waits.
    async fn send_timestamp_calls(self) {
        let mut guard = TimestampSenderGuard {
            waiters: self.timestamps.clone(),
            finished: false,
        };
        loop {
            let (batch, preferred) = {
                let mut w = self.timestamps.lock().unwrap_or_else(|p| p.into_inner());
                if w.waiting.is_empty() {
                    w.in_flight = false;
                    guard.finished = true;
                    return;
                }
                let n = w
                    .waiting
                    .len()
                    .min(limits::MAX_TIMESTAMPS_PER_CALL as usize);
                let batch: Vec<_> = w.waiting.drain(..n).collect();
                (batch, w.oracle_addr.iter().cloned().collect::<Vec<_>>())
            };
            let count = batch.len() as u64;
            let answer = self
                .cluster_call_within(self.options.call_deadline_ms, preferred, |ch| async move {
                    TxnClient::new(ch)
                        .get_timestamps(GetTimestampsRequest { count })
                        .await
                })
                .await;
            let result = match answer {
                Ok((resp, addr)) if resp.count == count => {
                    self.timestamps
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .oracle_addr = Some(addr);
                    Ok(resp.first)
                }
                Ok((resp, addr)) => Err(ClientError::Internal(format!(
                    "{addr} handed out {} timestamps for {count} asked",
                    resp.count
                ))),
                Err(e) => Err(e),
            };
            for (i, waiter) in batch.into_iter().enumerate() {
                let _ = waiter.send(result.clone().map(|first| first + i as u64));
            }
        }
    }

    /// The range map from the meta range, with each range's leader and load when the
    /// meta-range leader answered.
    pub async fn range_list(&self) -> Result<RangeListResponse, ClientError> {
        // The map comes in pages (by range id) so that no answer outgrows a message.
        let list = |preferred: Vec<String>| async move {
            let mut all = RangeListResponse::default();
            for _ in 0..limits::MAX_RANGE_LIST_PAGES {
                let after_range_id = all.ranges.last().map_or(0, |d| d.range_id);
                let page = self
                    .admin_call(preferred.clone(), move |mut admin| async move {
                        let mut req = tonic::Request::new(RangeListRequest {
                            after_range_id,
                            limit: 0,
                        });
                        req.set_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS * 2));
                        admin.range_list(req).await
                    })
                    .await?;
                all.nodes = page.nodes;
                all.leader_id = page.leader_id;
                all.loads.extend(page.loads);
                let progressed = !page.ranges.is_empty();
                all.ranges.extend(page.ranges);
                if !page.more || !progressed {
                    return Ok(all);
                }
            }
            Err(ClientError::Unavailable(format!(
                "the range map did not end within {} pages",
                limits::MAX_RANGE_LIST_PAGES
            )))
        };
        let mut resp = list(Vec::new()).await?;
        // Any meta replica lists the ranges; only the meta leader knows leaders and load.
        // Ask it once when the first answer came from elsewhere.
        if resp.loads.is_empty() {
            let leader_addr = resp
                .leader_id
                .and_then(|id| resp.nodes.iter().find(|n| n.node_id == id))
                .map(|n| n.addr.clone());
            if let Some(addr) = leader_addr {
                if let Ok(from_leader) = list(vec![addr]).await {
                    if !from_leader.loads.is_empty() {
                        resp = from_leader;
                    }
                }
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for n in &resp.nodes {
            cache.nodes.insert(n.node_id, n.addr.clone());
        }
        cache.install(&resp.ranges);
        for l in &resp.loads {
            // A leader the meta range reported that is no longer a voter is stale.
            let voter = |n: u64| {
                resp.ranges
                    .iter()
                    .any(|d| d.range_id == l.range_id && d.voters.contains(&n))
            };
            match l.leader_node_id {
                Some(leader) if voter(leader) => {
                    cache.leaders.insert(l.range_id, leader);
                }
                _ => {
                    cache.leaders.remove(&l.range_id);
                }
            }
        }
        Ok(resp)
    }

    /// Reloads range descriptors and node addresses from the meta range.
    pub async fn refresh_ranges(&self) -> Result<(), ClientError> {
        self.range_list().await.map(|_| ())
    }

    /// Splits the range holding the encoded key `split_key` at that key's row. Retries
    /// (within the call deadline) while the range moves or changes leader.
    pub async fn split(&self, split_key: &[u8]) -> Result<SplitResponse, ClientError> {
        let started = Instant::now();
        let mut backoff_ms = INITIAL_BACKOFF_MS;
        let mut last_error = ClientError::Unavailable("no attempt made".into());
        for _ in 0..self.options.retry_budget {
            if started.elapsed() >= Duration::from_millis(self.options.call_deadline_ms) {
                break;
            }
            if let Err(e) = self.refresh_ranges().await {
                last_error = e;
            } else {
                let preferred = {
                    let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    match cache.lookup(split_key) {
                        Some(d) => {
                            let leader = cache.leaders.get(&d.range_id).copied();
                            leader
                                .into_iter()
                                .chain(d.voters.iter().copied())
                                .filter_map(|id| cache.nodes.get(&id).cloned())
                                .collect()
                        }
                        None => Vec::new(),
                    }
                };
                let key = split_key.to_vec();
                let attempt = self
                    .admin_call(preferred, |mut admin| {
                        let key = key.clone();
                        async move { admin.split(SplitRequest { split_key: key }).await }
                    })
                    .await;
                match attempt {
                    Ok(resp) => return Ok(resp),
                    Err(e @ ClientError::InvalidArgument(_)) => return Err(e),
                    Err(e) => last_error = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
        }
        Err(last_error)
    }

    /// Merges range `left_range_id` with its right neighbour; returns the merged range. The
    /// meta-range leader first moves the neighbour's replicas next to the left range's, so
    /// this can take as long as a few snapshot transfers. Retries within
    /// [`MERGE_DEADLINE_MS`]; a retry never merges a second neighbour.
    pub async fn merge(&self, left_range_id: u64) -> Result<RangeDescriptor, ClientError> {
        let list = self.range_list().await?;
        let left = list
            .ranges
            .iter()
            .find(|r| r.range_id == left_range_id)
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!("range {left_range_id} does not exist"))
            })?;
        let right = list
            .ranges
            .iter()
            .find(|r| !left.end_key.is_empty() && r.start_key == left.end_key)
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!(
                    "range {left_range_id} is the last range; there is nothing to merge it with"
                ))
            })?
            .range_id;
        let old_end = left.end_key.clone();
        let started = Instant::now();
        let mut backoff_ms = INITIAL_BACKOFF_MS;
        let mut last_error = ClientError::Unavailable("no attempt made".into());
        for _ in 0..self.options.retry_budget {
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if elapsed_ms >= MERGE_DEADLINE_MS {
                break;
            }
            let remaining_ms = MERGE_DEADLINE_MS - elapsed_ms;
            let attempt = self
                .admin_call_within(remaining_ms, Vec::new(), |mut admin| async move {
                    admin
                        .merge(MergeRequest {
                            left_range_id,
                            expected_right_range_id: Some(right),
                        })
                        .await
                })
                .await;
            match attempt {
                Ok(resp) => {
                    return resp.merged.ok_or_else(|| {
                        ClientError::Internal("merge answered without a descriptor".into())
                    })
                }
                Err(e @ ClientError::InvalidArgument(_)) => return Err(e),
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
            // An attempt that timed out may still have merged.
            if let Ok(list) = self.range_list().await {
                let merged = list
                    .ranges
                    .iter()
                    .find(|r| r.range_id == left_range_id && r.end_key != old_end);
                if let Some(m) = merged {
                    if !list.ranges.iter().any(|r| r.range_id == right) {
                        return Ok(m.clone());
                    }
                }
            }
        }
        Err(last_error)
    }

    /// Starts (or continues) draining `node_id`; returns how many replicas it still holds.
    pub async fn decommission(&self, node_id: u64) -> Result<u64, ClientError> {
        self.admin_call(Vec::new(), |mut admin| async move {
            admin.decommission(DecommissionRequest { node_id }).await
        })
        .await
        .map(|r| r.replicas_left)
    }

    /// Picks the address to send a request for `range` to on attempt `attempt`.
    fn target(&self, range: &RangeDescriptor, attempt: u32) -> String {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = cache
            .leaders
            .get(&range.range_id)
            .and_then(|id| cache.nodes.get(id))
        {
            return addr.clone();
        }
        let mut all: Vec<&String> = range
            .voters
            .iter()
            .filter_map(|id| cache.nodes.get(id))
            .collect();
        if all.is_empty() {
            all = self.seeds.iter().collect();
        }
        all[attempt as usize % all.len()].clone()
    }

    pub(crate) fn note_failure(&self, range: &RangeDescriptor, err: &ClientError) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match err {
            ClientError::NotLeader { leader: Some(l) } => {
                cache.nodes.insert(l.node_id, l.addr.clone());
                cache.leaders.insert(range.range_id, l.node_id);
            }
            ClientError::KeyNotInRange { descriptors, .. }
            | ClientError::StaleGeneration { descriptors, .. } => {
                cache.install(descriptors);
            }
            _ => {
                cache.leaders.remove(&range.range_id);
            }
        }
    }

    /// Runs `op` on a `Kv` stub against the range holding `routing_key` (see
    /// [`Client::call_with`]).
    async fn call<T, F, Fut>(
        &self,
        routing_key: &[u8],
        retry: Retry,
        op: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(KvClient<Channel>, Header, RangeDescriptor) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call_with(routing_key, retry, Client::kv, op).await
    }

    /// `Feed` stub for `addr`.
    pub(crate) fn feed_stub(&self, addr: &str) -> Result<FeedClient<Channel>, ClientError> {
        Ok(FeedClient::new(self.channel(addr)?)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES))
    }

    /// `Txn` stub for `addr`.
    pub(crate) fn txn_stub(&self, addr: &str) -> Result<TxnClient<Channel>, ClientError> {
        Ok(TxnClient::new(self.channel(addr)?)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES))
    }

    /// Runs `op` on the stub `stub` makes for a node of the range holding `routing_key`,
    /// with retries, backoff and deadline. Errors that name a transaction's state (locks,
    /// conflicts, aborts) come back at once: the caller decides what they mean.
    pub(crate) async fn call_with<S, M, T, F, Fut>(
        &self,
        routing_key: &[u8],
        retry: Retry,
        stub: M,
        op: F,
    ) -> Result<T, ClientError>
    where
        M: Fn(&Client, &str) -> Result<S, ClientError>,
        F: Fn(S, Header, RangeDescriptor) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let deadline = Duration::from_millis(self.options.call_deadline_ms);
        let mut backoff_ms = INITIAL_BACKOFF_MS;
        let mut last_error = ClientError::Unavailable("no attempt made".into());
        // Whether the previous attempt failed with a hint that was followed without a pause.
        let mut followed_hint = false;
        for attempt in 0..self.options.retry_budget {
            let remaining = match deadline.checked_sub(started.elapsed()) {
                Some(r) if !r.is_zero() => r,
                _ => break,
            };
            let range = {
                let found = self
                    .cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lookup(routing_key);
                match found {
                    Some(r) => r,
                    None => {
                        if let Err(e) = self.refresh_ranges().await {
                            last_error = e;
                            tokio::time::sleep(Duration::from_millis(backoff_ms).min(remaining))
                                .await;
                            backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
                            continue;
                        }
                        let found = self
                            .cache
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .lookup(routing_key);
                        match found {
                            Some(r) => r,
                            None => {
                                // The meta range's copy lags a split by up to a heartbeat
                                // period: wait and look again.
                                last_error = ClientError::RangeNotFound(
                                    "no range in the range map covers the key".into(),
                                );
                                tokio::time::sleep(
                                    Duration::from_millis(backoff_ms).min(remaining),
                                )
                                .await;
                                backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
                                continue;
                            }
                        }
                    }
                }
            };
            let (keyspace, sphere_id) = match keys::decode_sphere_key(routing_key) {
                Some((Keyspace::Sql, sphere, _)) => (WireKeyspace::Sql, sphere),
                Some((Keyspace::Kv, sphere, _)) => (WireKeyspace::Kv, sphere),
                None => (WireKeyspace::Kv, 0),
            };
            let header = Header {
                sphere_id,
                keyspace: keyspace as i32,
                range: Some(RangeRef {
                    range_id: range.range_id,
                    generation: range.generation,
                }),
                causal_ts: self.causal_ts.load(Ordering::Relaxed),
            };
            // A replica on a node this client has not heard of (added since the last range
            // map): reload the map, which names every node.
            let unknown_voter = {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                range.voters.iter().any(|id| !cache.nodes.contains_key(id))
            };
            // On failure the call goes on with the addresses it knows; the reload's error is
            // reported with the attempt's, should that fail too.
            let reload_error = if unknown_voter {
                self.refresh_ranges().await.err()
            } else {
                None
            };
            let addr = self.target(&range, attempt);
            let attempt_budget = match retry {
                Retry::Always => remaining.min(Duration::from_millis(READ_ATTEMPT_TIMEOUT_MS)),
                Retry::OnlyIfNotApplied => remaining,
            };
            let result = match tokio::time::timeout(
                attempt_budget,
                op(stub(self, &addr)?, header, range.clone()),
            )
            .await
            {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => ClientError::from_status(&status),
                Err(_) => ClientError::OutcomeUnknown(format!(
                    "no answer from {addr} before the deadline"
                )),
            };
            match &result {
                ClientError::InvalidArgument(_)
                | ClientError::Corruption(_)
                | ClientError::Internal(_)
                | ClientError::ResourceExhausted(_)
                | ClientError::HistoryCompacted { .. }
                | ClientError::Locked { .. }
                | ClientError::WriteConflict { .. }
                | ClientError::TxnAborted(_) => return Err(result),
                e if retry == Retry::OnlyIfNotApplied && !e.is_rejected_before_apply() => {
                    return Err(result)
                }
                ClientError::RangeNotFound(_) => {
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ranges
                        .clear();
                }
                _ => {}
            }
            self.note_failure(&range, &result);
            let follow_hint = matches!(&result, ClientError::NotLeader { leader: Some(_) })
                || matches!(
                    &result,
                    ClientError::KeyNotInRange { .. } | ClientError::StaleGeneration { .. }
                );
            last_error = match reload_error {
                Some(reload) => ClientError::Unavailable(format!(
                    "{result}; reloading the range map also failed: {reload}"
                )),
                None => result,
            };
            // A fresh hint is followed at once; a second one in a row backs off like any
            // other failure. During an election or a leadership transfer two replicas can
            // point at each other (or a leader-elect at itself) for a moment, and following
            // those hints without a pause spent the whole retry budget in milliseconds.
            if !follow_hint || followed_hint {
                tokio::time::sleep(Duration::from_millis(backoff_ms).min(remaining)).await;
                backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
            }
            followed_hint = follow_hint;
        }
        Err(match last_error {
            e @ ClientError::OutcomeUnknown(_) => e,
            e => ClientError::DeadlineExceeded {
                deadline_ms: self.options.call_deadline_ms,
                last_error: e.to_string(),
            },
        })
    }

    /// Reads `key` of `sphere`: its latest value, linearizably.
    pub async fn get(&self, sphere: u64, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.read_key(Keyspace::Kv, sphere, key, 0).await
    }

    /// Reads `key` of `sphere` as it was at `ts`, a timestamp from [`Client::timestamp`]:
    /// every write acknowledged before the oracle handed `ts` out is seen, and the answer
    /// never changes (until GC passes `ts`).
    pub async fn get_at(
        &self,
        sphere: u64,
        key: &[u8],
        ts: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.get_at_in(Keyspace::Kv, sphere, key, ts).await
    }

    /// As [`Client::get_at`], in either keyspace of the sphere (`Keyspace::Sql`: a SQL row,
    /// `key` as the SQL layer encodes it after the sphere).
    pub async fn get_at_in(
        &self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
        ts: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        check_snapshot_ts(ts)?;
        let value = self.read_key(keyspace, sphere, key, ts).await?;
        // Served, so the oracle had handed it out.
        self.causal_ts.fetch_max(ts, Ordering::Relaxed);
        Ok(value)
    }

    async fn read_key(
        &self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
        at_ts: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        check_key(key)?;
        let consistency = self.options.consistency.wire();
        let routing_key = keyspace.key(sphere, key);
        self.resolving_locks(|| {
            self.call(
                &routing_key,
                Retry::Always,
                |mut kv, header, _| async move {
                    let resp = kv
                        .get(GetRequest {
                            header: Some(header),
                            key: key.to_vec(),
                            consistency,
                            at_ts,
                        })
                        .await?
                        .into_inner();
                    Ok(resp.found.then_some(resp.value))
                },
            )
        })
        .await
    }

    /// Writes `key = value` in `sphere`.
    pub async fn put(&self, sphere: u64, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        check_key(key)?;
        check_value(value)?;
        let routing_key = keys::kv_key(sphere, key);
        self.resolving_locks(|| {
            self.call(
                &routing_key,
                Retry::OnlyIfNotApplied,
                |mut kv, header, _| async move {
                    kv.put(PutRequest {
                        header: Some(header),
                        key: key.to_vec(),
                        value: value.to_vec(),
                    })
                    .await?;
                    Ok(())
                },
            )
        })
        .await
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, sphere: u64, key: &[u8]) -> Result<bool, ClientError> {
        check_key(key)?;
        let routing_key = keys::kv_key(sphere, key);
        self.resolving_locks(|| {
            self.call(
                &routing_key,
                Retry::OnlyIfNotApplied,
                |mut kv, header, _| async move {
                    Ok(kv
                        .delete(DeleteRequest {
                            header: Some(header),
                            key: key.to_vec(),
                        })
                        .await?
                        .into_inner()
                        .existed)
                },
            )
        })
        .await
    }

    /// Sets `key` to `new_value` (or deletes it when `None`) if it currently holds `expected`
    /// (`None`: absent). Returns whether it swapped and the value found.
    pub async fn compare_and_swap(
        &self,
        sphere: u64,
        key: &[u8],
        expected: Option<&[u8]>,
        new_value: Option<&[u8]>,
    ) -> Result<(bool, Option<Vec<u8>>), ClientError> {
        check_key(key)?;
        if let Some(v) = new_value {
            check_value(v)?;
        }
        let routing_key = keys::kv_key(sphere, key);
        self.resolving_locks(|| {
            self.call(
                &routing_key,
                Retry::OnlyIfNotApplied,
                |mut kv, header, _| async move {
                    let resp = kv
                        .compare_and_swap(CompareAndSwapRequest {
                            header: Some(header),
                            key: key.to_vec(),
                            expected: expected.map(<[u8]>::to_vec),
                            new_value: new_value.map(<[u8]>::to_vec),
                        })
                        .await?
                        .into_inner();
                    Ok((resp.succeeded, resp.current))
                },
            )
        })
        .await
    }

    /// Applies `ops` (`(key, Some(value))` puts, `(key, None)` deletes) atomically. Keys in
    /// one range commit in one Raft entry; keys that span ranges commit as a transaction
    /// (two-phase), retried on conflicts as [`Client::transact`] does.
    pub async fn batch(
        &self,
        sphere: u64,
        ops: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), ClientError> {
        let Some((first, _)) = ops.first() else {
            return Ok(());
        };
        if ops.len() > limits::MAX_BATCH_OPS {
            return Err(ClientError::InvalidArgument(format!(
                "batch of {} ops is over the limit of {}",
                ops.len(),
                limits::MAX_BATCH_OPS
            )));
        }
        let mut total_bytes = 0usize;
        for (k, v) in ops {
            check_key(k)?;
            if let Some(v) = v {
                check_value(v)?;
            }
            total_bytes += k.len() + v.as_ref().map_or(0, Vec::len);
        }
        if total_bytes > limits::MAX_BATCH_SIZE_BYTES {
            return Err(ClientError::InvalidArgument(format!(
                "batch of {total_bytes} bytes is over the limit of {} bytes",
                limits::MAX_BATCH_SIZE_BYTES
            )));
        }
        let wire_ops: Vec<WriteOp> = ops
            .iter()
            .map(|(k, v)| WriteOp {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let wire_ops = &wire_ops;
        // The range map is reloaded once before a batch is committed as a transaction: the
        // ranges this client cached may have merged since.
        let reloaded = &std::sync::atomic::AtomicBool::new(false);
        let routing_key = keys::kv_key(sphere, first);
        let single_range = self
            .resolving_locks(|| {
                self.call(
                    &routing_key,
                    Retry::OnlyIfNotApplied,
                    |mut kv, header, range| async move {
                        // A stale cache may also think one range holds every key; the server then
                        // answers KEY_NOT_IN_RANGE with fresh descriptors and this check runs again
                        // on them.
                        if wire_ops.iter().any(|op| {
                            !keys::span_contains(
                                &range.start_key,
                                &range.end_key,
                                &keys::kv_key(sphere, &op.key),
                            )
                        }) {
                            if !reloaded.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                self.refresh_ranges().await.map_err(|e| e.to_status())?;
                                return Err(ClientError::KeyNotInRange {
                                    message:
                                        "batch keys outside the cached range; range map reloaded"
                                            .into(),
                                    descriptors: Vec::new(),
                                }
                                .to_status());
                            }
                            // Spans ranges even on a fresh map: a transaction commits it.
                            return Ok(false);
                        }
                        kv.batch(BatchRequest {
                            header: Some(header),
                            ops: wire_ops.clone(),
                        })
                        .await?;
                        Ok(true)
                    },
                )
            })
            .await?;
        if single_range {
            return Ok(());
        }
        self.transact(|txn| {
            let ops = ops.to_vec();
            Box::pin(async move {
                for (key, value) in &ops {
                    match value {
                        Some(v) => txn.put(sphere, key, v)?,
                        None => txn.delete(sphere, key)?,
                    }
                }
                Ok(())
            })
        })
        .await
    }

    /// Returns up to `limit` pairs of `sphere` with `start <= key < end` (empty `end`: to the
    /// end of the sphere), in key order, following the scan across ranges. Each key is read
    /// linearizably (each range at its own latest timestamp).
    pub async fn scan(
        &self,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<Vec<KeyValue>, ClientError> {
        self.scan_span(Keyspace::Kv, sphere, start, end, limit, 0)
            .await
    }

    /// As [`Client::scan`], but every range is read as it was at `ts` (a timestamp from
    /// [`Client::timestamp`]): one consistent snapshot across ranges.
    pub async fn scan_at(
        &self,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
        ts: u64,
    ) -> Result<Vec<KeyValue>, ClientError> {
        self.scan_at_in(Keyspace::Kv, sphere, start, end, limit, ts)
            .await
    }

    /// As [`Client::scan_at`], in either keyspace of the sphere; keys are those after the
    /// keyspace's header (for `Keyspace::Sql`, as the SQL layer encodes rows).
    pub async fn scan_at_in(
        &self,
        keyspace: Keyspace,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
        ts: u64,
    ) -> Result<Vec<KeyValue>, ClientError> {
        check_snapshot_ts(ts)?;
        let pairs = self
            .scan_span(keyspace, sphere, start, end, limit, ts)
            .await?;
        self.causal_ts.fetch_max(ts, Ordering::Relaxed);
        Ok(pairs)
    }

    async fn scan_span(
        &self,
        keyspace: Keyspace,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
        at_ts: u64,
    ) -> Result<Vec<KeyValue>, ClientError> {
        let limit = if limit == 0 {
            limits::DEFAULT_SCAN_LIMIT
        } else {
            limit
        };
        let consistency = self.options.consistency.wire();
        let mut out: Vec<KeyValue> = Vec::new();
        let mut cursor = start.to_vec();
        while (out.len() as u32) < limit {
            let want = limit - out.len() as u32;
            // Only the failpoint `client-scan-resume-cached-end` uses it.
            let cached_end = if !cfg!(feature = "failpoints") {
                None
            } else {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache
                    .lookup(&keyspace.key(sphere, &cursor))
                    .map(|d| d.end_key)
            };
            let cursor_ref = &cursor;
            let routing_key = keyspace.key(sphere, cursor_ref);
            let resp = self
                .resolving_locks(|| {
                    self.call(
                        &routing_key,
                        Retry::Always,
                        |mut kv, header, _| async move {
                            Ok(kv
                                .scan(ScanRequest {
                                    header: Some(header),
                                    start: cursor_ref.clone(),
                                    end: end.to_vec(),
                                    limit: want,
                                    consistency,
                                    at_ts,
                                })
                                .await?
                                .into_inner())
                        },
                    )
                })
                .await?;
            out.extend(resp.pairs);
            if !resp.more {
                break;
            }
            // Resume exactly where the server stopped: the range it served may have split or
            // merged since this client cached it, so the cached range end proves nothing.
            if resp.resume_key <= cursor || (!end.is_empty() && resp.resume_key.as_slice() > end) {
                return Err(ClientError::Internal(format!(
                    "scan resumed at {:?}, outside ({cursor:?}, {end:?}]",
                    resp.resume_key
                )));
            }
            cursor = resp.resume_key;
            if let Some(end_key) = cached_end.filter(|_| resume_from_cached_end()) {
                // Deliberately broken: resumes at the end of the range this client had
                // cached before the page, which a split since then has moved past keys the
                // scan then skips.
                match end_key.strip_prefix(keyspace.key(sphere, b"").as_slice()) {
                    Some(user_key) if user_key > cursor.as_slice() => cursor = user_key.to_vec(),
                    Some(_) => {}
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// Status of the node at `addr`; `include_digest` adds a digest of each range's data.
    pub async fn status(
        &self,
        addr: &str,
        include_digest: bool,
    ) -> Result<StatusResponse, ClientError> {
        let mut req = tonic::Request::new(StatusRequest { include_digest });
        req.set_timeout(Duration::from_millis(self.options.call_deadline_ms));
        self.admin(addr)?
            .status(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ClientError::from_status(&s))
    }
}

/// A timestamp a read "as of" may name: one the oracle handed out, so never 0.
fn check_snapshot_ts(ts: u64) -> Result<(), ClientError> {
    if ts == 0 {
        return Err(ClientError::InvalidArgument(
            "timestamp 0 is before every write; read at a timestamp the oracle handed out".into(),
        ));
    }
    Ok(())
}

/// Whether the failpoint `client-scan-resume-cached-end` is active: always false unless the
/// client is built with the `failpoints` feature and the failpoint is configured.
fn resume_from_cached_end() -> bool {
    fail::fail_point!("client-scan-resume-cached-end", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(id: u64, start: &[u8], end: &[u8]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            generation: 1,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            voters: vec![],
            learners: vec![],
            replicas: vec![],
        }
    }

    #[test]
    fn routing_cache_ignores_descriptors_older_than_what_it_holds() {
        let mut cache = RoutingCache::default();
        let mut left = desc(2, b"", b"m");
        left.generation = 5;
        let mut right = desc(7, b"m", b"");
        right.generation = 5;
        cache.install(&[left, right]);
        // A stale replica of the parent, from before the split, hints its old span.
        let mut parent = desc(2, b"", b"");
        parent.generation = 4;
        cache.install(&[parent]);
        assert_eq!(cache.lookup(b"q").unwrap().range_id, 7);
        assert_eq!(cache.ranges.len(), 2);
    }

    #[test]
    fn routing_cache_finds_the_covering_range_and_replaces_overlaps() {
        let mut cache = RoutingCache::default();
        cache.install(&[desc(1, b"", b"m"), desc(2, b"m", b"")]);
        assert_eq!(cache.lookup(b"a").unwrap().range_id, 1);
        assert_eq!(cache.lookup(b"m").unwrap().range_id, 2);
        assert_eq!(cache.lookup(b"zzz").unwrap().range_id, 2);
        // A merge covering both replaces them.
        cache.install(&[desc(3, b"", b"")]);
        assert_eq!(cache.ranges.len(), 1);
        assert_eq!(cache.lookup(b"q").unwrap().range_id, 3);
    }
}
