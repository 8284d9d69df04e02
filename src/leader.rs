//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! reconciles.
//!
//! Every acquire, renew and release is a `replace` carrying the resourceVersion that was read: if
//! another replica wrote the Lease in between, the API server answers 409 and this replica has not
//! taken it. A holder's Lease counts as expired only when *this* process has seen it unchanged for
//! a whole lease duration (as client-go does), so clocks of different machines never matter.
//! A leader that cannot renew within the renew deadline (shorter than the lease duration) gives
//! up, and the caller stops reconciling before any standby may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::http::{Health, Role};

/// What to do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free, or its holder stopped renewing: take it.
    Acquire,
    /// Someone else holds it and renews it: wait.
    Follow { holder: String },
}

/// The decision, from the Lease's holder, our identity, the lease duration, and how long this
/// process has seen the Lease unchanged.
pub fn decide(holder: Option<&str>, me: &str, lease_duration: Duration, unchanged_for: Duration) -> Decision {
    match holder {
        None | Some("") => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(_) if unchanged_for >= lease_duration => Decision::Acquire,
        Some(h) => Decision::Follow {
            holder: h.to_string(),
        },
    }
}

/// How long a leader keeps trying to renew before it gives up: two thirds of the lease duration,
/// so it stops before a standby can see the Lease expired.
pub fn renew_deadline(lease_duration: Duration) -> Duration {
    lease_duration * 2 / 3
}

/// How often to try to acquire or renew.
pub fn retry_period(lease_duration: Duration) -> Duration {
    (lease_duration / 5).max(Duration::from_millis(500))
}

/// The identity of this process: the pod name in a cluster, else the host and process id.
pub fn default_identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.is_empty()
    {
        return name;
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "baker".into());
    format!("{host}-{}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {name}: another replica may reconcile now")]
    Lost { name: String },
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// The resourceVersion last seen and when this process first saw it.
    observed: Option<(String, Instant)>,
}

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            lease_duration,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, previous: Option<&LeaseSpec>, acquire: bool) -> LeaseSpec {
        let now = micro_now();
        let mut spec = previous.cloned().unwrap_or_default();
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.lease_duration.as_secs().max(1) as i32);
        spec.renew_time = Some(now.clone());
        if acquire {
            spec.acquire_time = Some(now);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec
    }

    /// One attempt: true when this process holds the Lease afterwards.
    pub async fn try_once(&mut self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..self.spec(None, true)
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let unchanged_for = self.observe(&lease);
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        let acquire = match decide(holder, &self.identity, self.lease_duration, unchanged_for) {
            Decision::Follow { .. } => return Ok(false),
            Decision::Renew => false,
            Decision::Acquire => true,
        };
        let mut next = lease.clone();
        // `replace` sends metadata.resourceVersion: a write by anyone since our read fails with 409.
        next.spec = Some(self.spec(lease.spec.as_ref(), acquire));
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(written) => {
                if acquire {
                    info!(lease = %self.name, identity = %self.identity, previous = holder.unwrap_or(""), "acquired the leader lease");
                }
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records the Lease's resourceVersion; returns how long it has been unchanged.
    fn observe(&mut self, lease: &Lease) -> Duration {
        let rv = lease.resource_version().unwrap_or_default();
        match &self.observed {
            Some((seen, at)) if *seen == rv => at.elapsed(),
            _ => {
                self.observed = Some((rv, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Waits until this process holds the Lease, reporting standby meanwhile.
    pub async fn acquire(&mut self, health: &Health) {
        let retry = retry_period(self.lease_duration);
        let mut announced = false;
        loop {
            match self.try_once().await {
                Ok(true) => {
                    health.set_role(Role::Leader);
                    return;
                }
                Ok(false) => {
                    if !announced {
                        info!(lease = %self.name, identity = %self.identity, "standing by: another replica holds the leader lease");
                        announced = true;
                    }
                    health.set_role(Role::Standby);
                }
                Err(e) => warn!(error = %e, lease = %self.name, "could not read or write the leader lease"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease until that fails for longer than the renew deadline, or another replica
    /// holds it; then returns the loss.
    pub async fn keep(&mut self) -> LeaderError {
        let retry = retry_period(self.lease_duration);
        let deadline = renew_deadline(self.lease_duration);
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match self.try_once().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break,
                Err(e) => warn!(error = %e, lease = %self.name, "could not renew the leader lease"),
            }
            if renewed.elapsed() >= deadline {
                break;
            }
        }
        LeaderError::Lost {
            name: self.name.clone(),
        }
    }

    /// Gives the Lease up (on a clean shutdown), so a standby takes over without waiting for it to
    /// expire. Best effort, guarded by the resourceVersion like every write.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(micro_now());
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            warn!(error = %e, lease = %self.name, "could not release the leader lease");
        } else {
            info!(lease = %self.name, "released the leader lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_lease_is_acquired() {
        assert_eq!(decide(None, "a", D, Duration::ZERO), Decision::Acquire);
        assert_eq!(decide(Some(""), "a", D, Duration::ZERO), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(
            decide(Some("a"), "a", D, Duration::from_secs(100)),
            Decision::Renew
        );
    }

    #[test]
    fn a_lease_renewed_recently_by_another_is_followed() {
        assert_eq!(
            decide(Some("b"), "a", D, Duration::from_secs(14)),
            Decision::Follow { holder: "b".into() }
        );
    }

    #[test]
    fn a_lease_unchanged_for_a_whole_duration_is_taken_over() {
        assert_eq!(decide(Some("b"), "a", D, D), Decision::Acquire);
    }

    #[test]
    fn a_leader_gives_up_before_a_standby_may_take_over() {
        assert!(renew_deadline(D) < D);
        assert!(retry_period(D) < renew_deadline(D));
        assert!(retry_period(Duration::from_secs(1)) >= Duration::from_millis(500));
    }
}
