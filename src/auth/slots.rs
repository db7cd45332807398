//! Verification slots: how many bcrypt hashes run at once, and how many of them one client
//! may hold.
//!
//! A single FIFO of slots lets whoever queues most take every slot: sixty wrong passwords
//! from one address put every other client sixty hashes back. So each client also has its
//! own small queue in front of the shared one, holding at most half the slots (at least
//! one): one address can never occupy the last free slot while another client waits.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limits::ClientKey;

/// The shared slots and each waiting client's share of them.
pub struct Slots {
    global: Arc<Semaphore>,
    share: usize,
    /// Only clients with a request waiting or hashing are here: a turn removes its
    /// client's entry when it is the last one using it, so the map needs no sweeping.
    clients: Arc<DashMap<ClientKey, Arc<Semaphore>>>,
}

impl Slots {
    /// `total` hashes at once, at most half of them (at least one) for one client.
    pub fn new(total: usize) -> Slots {
        Slots { global: Arc::new(Semaphore::new(total)), share: (total / 2).max(1), clients: Arc::default() }
    }

    /// A slot for `client`, or `None` when none came free within `wait`.
    pub async fn acquire(&self, client: &ClientKey, wait: Duration) -> Option<Slot> {
        let entry = self.clients.entry(client.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.share)));
        let sem = Arc::clone(entry.value());
        drop(entry);
        // Made before the wait, so a wait that times out or is cancelled cleans up too.
        let mut turn = ClientTurn {
            clients: Arc::clone(&self.clients),
            key: client.clone(),
            sem: Some(Arc::clone(&sem)),
            permit: None,
        };
        let global = Arc::clone(&self.global);
        tokio::time::timeout(wait, async move {
            turn.permit = Some(sem.acquire_owned().await.ok()?);
            let global = global.acquire_owned().await.ok()?;
            Some(Slot { _global: global, _turn: turn })
        })
        .await
        .ok()
        .flatten()
    }

    /// Clients with a request waiting or hashing now.
    #[cfg(test)]
    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// One running verification's place: dropping it frees the slot and the client's turn.
pub struct Slot {
    _global: OwnedSemaphorePermit,
    _turn: ClientTurn,
}

/// A client's turn, held from the moment it starts waiting; on drop it removes the client's
/// entry if nobody else holds that semaphore (checked under the map's shard lock, the same
/// lock under which new waiters clone it, so a waiter never loses its queue).
struct ClientTurn {
    clients: Arc<DashMap<ClientKey, Arc<Semaphore>>>,
    key: ClientKey,
    sem: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for ClientTurn {
    fn drop(&mut self) {
        self.permit.take();
        self.sem.take();
        self.clients.remove_if(&self.key, |_, s| Arc::strong_count(s) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8) -> ClientKey {
        ClientKey::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
    }

    #[tokio::test]
    async fn one_client_holds_at_most_half_and_leaves_no_state() {
        let slots = Slots::new(4);
        let wait = Duration::from_millis(20);
        let a1 = slots.acquire(&key(2), wait).await.expect("first slot");
        let a2 = slots.acquire(&key(2), wait).await.expect("second slot: half of four");
        assert!(slots.acquire(&key(2), wait).await.is_none(), "a third would be more than half");
        let b1 = slots.acquire(&key(3), wait).await.expect("another client still gets one");
        let b2 = slots.acquire(&key(3), wait).await.expect("and its own half");
        assert!(slots.acquire(&key(4), wait).await.is_none(), "all four in use");
        assert_eq!(slots.clients(), 2);
        drop((a1, a2, b1, b2));
        assert_eq!(slots.clients(), 0, "no waiting client, no entry");
        // Two slots: one client gets one, so the other always finds one free.
        let slots = Slots::new(2);
        let _a = slots.acquire(&key(2), wait).await.unwrap();
        assert!(slots.acquire(&key(2), wait).await.is_none());
        assert!(slots.acquire(&key(3), wait).await.is_some());
    }
}
