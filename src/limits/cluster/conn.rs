//! The one connection type the scripts, leases and grants use, to a single Redis node or to a
//! Redis Cluster, and the batches the background task sends through it.
//!
//! A single node keeps the `ConnectionManager` (one multiplexed, reconnecting connection):
//! nothing changes for it. A cluster gets the crate's `ClusterConnection`, which routes each
//! command by its key's slot and follows `MOVED`/`ASK`; every script touches the keys of one
//! slot (`keys`), so `EVALSHA` goes to the master owning it, and a `NOSCRIPT` there makes
//! `Script::invoke_async` load the script on that same node. `SCRIPT LOAD` alone goes to
//! every master. The cluster connection is made on first use, not at start-up: a cluster that
//! is down when veilgate starts only means the fail mode answers until it is up.
//!
//! A pipeline is another matter: the crate sends a whole pipeline to the node of its first
//! keyed command and refuses one whose commands name several slots ("crossed slots"), while
//! a release or renewal batch covers many clients. [`Batch`] therefore makes one pipeline
//! per slot on a cluster (sent concurrently) and one pipeline in all on a single node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::Mutex;

/// A connection to one Redis node or to a Redis Cluster; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made at its first use, and again after a failed attempt.
pub(super) struct LazyCluster {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
}

impl LazyCluster {
    pub(super) fn new(client: ClusterClient) -> LazyCluster {
        LazyCluster { client, conn: Mutex::new(None) }
    }

    /// The connection, made now if there is none yet. Callers wait for one attempt at most
    /// (bounded by the client's connection timeout and by each caller's own deadline).
    async fn get(&self) -> RedisResult<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = self.client.get_async_connection().await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(lazy) => {
                Box::pin(async move { lazy.get().await?.req_packed_commands(cmd, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            // A cluster has database 0 only.
            Conn::Cluster(_) => 0,
        }
    }
}

/// The Redis Cluster slot of `key`: CRC16 of its hash tag (the text between the first `{`
/// and the next `}`, when not empty), or of the whole key, modulo 16384.
pub(super) fn slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tagged = k
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| k[open + 1..].iter().position(|b| *b == b'}').map(|len| &k[open + 1..open + 1 + len]))
        .filter(|t| !t.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(k)) % 16384
}

/// Commands over many clients' keys, sent as one pipeline (single node) or one per slot.
pub(super) struct Batch {
    cluster: bool,
    /// Pipelines by slot; on a single node only slot 0 is used.
    pipes: HashMap<u16, Pipeline>,
}

impl Batch {
    pub(super) fn new(conn: &Conn) -> Batch {
        Batch { cluster: matches!(conn, Conn::Cluster(_)), pipes: HashMap::new() }
    }

    /// The pipeline commands on `key` go into.
    pub(super) fn on(&mut self, key: &str) -> &mut Pipeline {
        let slot = if self.cluster { slot(key) } else { 0 };
        self.pipes.entry(slot).or_insert_with(redis::pipe)
    }

    /// Sends every pipeline; every command must have been `ignore`d.
    pub(super) async fn exec(self, conn: &Conn) -> RedisResult<()> {
        self.query_on::<()>(conn, None).await.map(|_| ())
    }

    /// Sends every pipeline and answers what the pipeline holding `key` answers (the only
    /// commands not `ignore`d must be on keys of that slot).
    pub(super) async fn query<T: FromRedisValue>(self, conn: &Conn, key: &str) -> RedisResult<T> {
        match self.query_on::<T>(conn, Some(key)).await? {
            Some(v) => Ok(v),
            None => Err(RedisError::from((redis::ErrorKind::Client, "no command on the asked key"))),
        }
    }

    async fn query_on<T: FromRedisValue>(self, conn: &Conn, key: Option<&str>) -> RedisResult<Option<T>> {
        let wanted = key.map(|k| if self.cluster { slot(k) } else { 0 });
        let calls = self.pipes.into_iter().map(|(slot, p)| {
            let mut conn = conn.clone();
            async move {
                if Some(slot) == wanted {
                    p.query_async::<T>(&mut conn).await.map(Some)
                } else {
                    p.query_async::<()>(&mut conn).await.map(|()| None)
                }
            }
        });
        Ok(try_join_all(calls).await?.into_iter().flatten().next())
    }
}

/// A cluster client for `nodes` (URLs of some of its masters; the rest are discovered), with
/// the chores' deadline for connecting and for each answer, and one retry per command.
pub(super) fn cluster_client(nodes: &[&str], deadline: Duration) -> RedisResult<ClusterClient> {
    ClusterClient::builder(nodes.iter().copied())
        .connection_timeout(deadline)
        .response_timeout(deadline)
        .retries(1)
        .build()
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis_cluster_keyslot() {
        // Values from `CLUSTER KEYSLOT` of a real Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("vg:{v4:127.0.0.2}:conn"), slot("vg:{v4:127.0.0.2}:rate"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }
}
