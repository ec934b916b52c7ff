//! The budget of calls to the real IMDS, shared fairly between callers.
//!
//! IMDS throttles per VM (a handful of identity requests at once), so everything the agent sends there (token fetches
//! and forwarded metadata requests) draws on one global budget, [`Config::max_concurrent_fetches`]. Within it, each
//! caller (one cgroup) may have at most [`Config::max_upstream_per_caller`] requests that may reach IMDS in flight;
//! its further requests wait for its own earlier ones, never for other callers' places. A caller asking for many
//! distinct resources, or flooding `/metadata/instance`, thus slows down only itself.
//!
//! A caller waits for its own place at most [`RetryPolicy::total`]; a caller whose own queue is longer than that gets
//! a retryable 429. The call itself then has its own bound of the same length.
//!
//! [`Config::max_concurrent_fetches`]: super::Config::max_concurrent_fetches
//! [`Config::max_upstream_per_caller`]: super::Config::max_upstream_per_caller
//! [`RetryPolicy::total`]: super::token::RetryPolicy::total

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The global budget and every caller's share of it.
#[derive(Debug)]
pub struct UpstreamBudget {
    global: Arc<Semaphore>,
    per_caller: usize,
    callers: Mutex<HashMap<u64, Arc<Semaphore>>>,
}

/// A caller's place in its own queue: held while its request may reach IMDS. The global permit is taken where the
/// call is made ([`UpstreamBudget::global`]), so a request that joins another's token fetch costs IMDS nothing.
#[derive(Debug)]
pub struct CallerShare {
    budget: Arc<UpstreamBudget>,
    caller: u64,
    permit: Option<OwnedSemaphorePermit>,
}

/// The caller's own queue was longer than the wait allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this caller already has {0} requests to IMDS in flight; retry")]
pub struct CallerBusy(pub usize);

impl UpstreamBudget {
    pub fn new(global: usize, per_caller: usize) -> Arc<Self> {
        Arc::new(UpstreamBudget {
            global: Arc::new(Semaphore::new(global.max(1))),
            per_caller: per_caller.max(1),
            callers: Mutex::new(HashMap::new()),
        })
    }

    /// The global semaphore, for whoever makes the call to IMDS.
    pub fn global(&self) -> Arc<Semaphore> {
        Arc::clone(&self.global)
    }

    /// Waits (at most `wait`) for a place in `caller`'s own share.
    pub async fn caller_share(
        self: &Arc<Self>,
        caller: u64,
        wait: Duration,
    ) -> Result<CallerShare, CallerBusy> {
        let own = {
            let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                callers
                    .entry(caller)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_caller))),
            )
        };
        // Forgets the caller's entry if this wait ends without a place: timed out, or the request was dropped while
        // waiting (its client went away); declared first, so it runs after the wait has let go of the semaphore.
        let mut waiting = Waiting {
            budget: self,
            caller,
            done: false,
        };
        let acquired = tokio::time::timeout(wait, own.acquire_owned()).await;
        // The semaphore is never closed, so only the timeout fails here.
        let Ok(Ok(permit)) = acquired else {
            return Err(CallerBusy(self.per_caller));
        };
        waiting.done = true;
        Ok(CallerShare {
            budget: Arc::clone(self),
            caller,
            permit: Some(permit),
        })
    }

    /// Drops `caller`'s entry once nobody holds or waits for it, so memory follows the callers active right now.
    fn forget_if_idle(&self, caller: u64) {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map's own reference left: no holder, no waiter (both keep a clone while they wait or hold).
        if callers
            .get(&caller)
            .is_some_and(|own| Arc::strong_count(own) == 1)
        {
            callers.remove(&caller);
        }
    }

    #[cfg(test)]
    pub fn callers(&self) -> usize {
        self.callers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A caller waiting for its place; see [`UpstreamBudget::caller_share`].
struct Waiting<'a> {
    budget: &'a UpstreamBudget,
    caller: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.budget.forget_if_idle(self.caller);
        }
    }
}

impl Drop for CallerShare {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.budget.forget_if_idle(self.caller);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caller_waits_only_for_its_own_requests_and_its_entry_goes_with_them() {
        let budget = UpstreamBudget::new(5, 2);
        let wait = Duration::from_millis(100);
        let a1 = budget.caller_share(1, wait).await.expect("first");
        let a2 = budget.caller_share(1, wait).await.expect("second");
        assert_eq!(
            budget.caller_share(1, wait).await.err(),
            Some(CallerBusy(2)),
            "a third waits for its own, and gives up after the wait"
        );
        let b = budget
            .caller_share(2, wait)
            .await
            .expect("another caller is not held up");

        // A waiter gets the place its caller gives back.
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.caller_share(1, Duration::from_secs(5)).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a1);
        assert!(waiting.await.expect("task"));
        drop((a2, b));
        assert_eq!(
            budget.callers(),
            0,
            "no entry outlives its caller's requests"
        );
    }
}
