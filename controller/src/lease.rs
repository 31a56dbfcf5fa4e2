//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several controller
//! replicas only one writes (status conditions); every replica watches, serves discover and
//! answers the webhook, which only read.
//!
//! The usual client-go protocol, written against the Lease API directly: a replica holds
//! the lease while it renews it within `leaseDurationSeconds`; another takes it over only
//! once it has expired. Every write is a `replace` carrying the `resourceVersion` read, so of
//! two replicas racing for an expired lease the API server lets one win (the other gets
//! 409 Conflict). A leader that cannot renew steps down on its own before the lease can
//! expire for the others (after `renew_deadline`), so two leaders never overlap as long as
//! clocks tick at the same rate.
//!
//! [`decide`] is the pure rule; [`Elector::try_once`] one round against the API;
//! [`Elector::run`] the loop that publishes leadership on a `watch` channel.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease lasts without renewal (client-go's default: 15 s).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (10 s); shorter than
    /// `lease_duration`, so it stops writing before another can take over.
    pub renew_deadline: Duration,
    /// Time between attempts (2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults client-go uses, for `identity`.
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Someone else held it and it expired (or nobody holds it): take it over.
    TakeOver,
    /// Someone else holds it and it is live: follow.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// The rule: from the lease as read (if any), our identity and the time now.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return match lease {
            None => Decision::Create,
            Some(_) => Decision::TakeOver,
        };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if t.checked_add(duration).is_ok_and(|end| end > now) => Decision::Follow {
            holder: holder.to_owned(),
        },
        _ => Decision::TakeOver,
    }
}

/// The lease as we would write it, from the one read (`None`: a new one).
pub fn next_lease(cfg: &LeaseConfig, read: Option<&Lease>, now: Timestamp) -> Lease {
    let mut lease = read.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let previous = lease.spec.take().unwrap_or_default();
    let ours = previous.holder_identity.as_deref() == Some(cfg.identity.as_str());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(15)),
        acquire_time: if ours {
            previous.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(match (ours, read) {
            (true, _) | (false, None) => previous.lease_transitions.unwrap_or(0),
            (false, Some(_)) => previous.lease_transitions.unwrap_or(0) + 1,
        }),
        ..previous
    });
    lease
}

/// One replica's elector.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector").field("cfg", &self.cfg).finish()
    }
}

impl Elector {
    /// An elector for the lease `cfg` names, through `client`.
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: reads the lease and creates, renews or takes it over when the rule says
    /// so. `Ok(true)` when we hold it afterwards; a lost race (409) is `Ok(false)`.
    pub async fn try_once(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let read = self.api.get_opt(&self.cfg.name).await?;
        let decision = decide(read.as_ref(), &self.cfg.identity, now);
        let lease = next_lease(&self.cfg, read.as_ref(), now);
        let pp = PostParams::default();
        let written = match decision {
            Decision::Follow { .. } => return Ok(false),
            Decision::Create => self.api.create(&pp, &lease).await,
            Decision::Renew | Decision::TakeOver => {
                self.api.replace(&self.cfg.name, &pp, &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs rounds every `retry_period` until dropped, publishing whether this replica
    /// leads. A leader whose renewals fail for `renew_deadline` steps down.
    pub async fn run(self, leading: tokio::sync::watch::Sender<bool>) {
        let mut last_held: Option<tokio::time::Instant> = None;
        loop {
            let held = match self.try_once(Timestamp::now()).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(lease = %self.cfg.name, error = %e, "lease round failed");
                    // Keep leading only while the last renewal is recent enough.
                    last_held.is_some_and(|t| t.elapsed() < self.cfg.renew_deadline)
                }
            };
            if held {
                last_held = Some(tokio::time::Instant::now());
            } else {
                last_held = None;
            }
            let was = leading.send_replace(held);
            if was != held {
                tracing::info!(identity = %self.cfg.identity, leading = held, "leadership changed");
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: &str, secs: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "sidemesh-controller", "namespace": "sidemesh", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                     "acquireTime": "2026-11-22T03:00:00.000000Z",
                     "renewTime": renewed, "leaseTransitions": 2}
        }))
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_rule() {
        let now = at("2026-11-22T03:00:20Z");
        assert_eq!(decide(None, "a", now), Decision::Create);
        let live = lease("b", "2026-11-22T03:00:10.000000Z", 15);
        assert_eq!(
            decide(Some(&live), "a", now),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&live), "b", now), Decision::Renew);
        let expired = lease("b", "2026-11-22T03:00:04.000000Z", 15);
        assert_eq!(decide(Some(&expired), "a", now), Decision::TakeOver);
        let released = lease("", "2026-11-22T03:00:19.000000Z", 15);
        assert_eq!(decide(Some(&released), "a", now), Decision::TakeOver);
    }

    #[test]
    fn written_leases_keep_the_resource_version_and_count_transitions() {
        let cfg = LeaseConfig::new("sidemesh", "sidemesh-controller", "a");
        let now = at("2026-11-22T03:00:20Z");
        let taken = next_lease(&cfg, Some(&lease("b", "2026-11-22T03:00:01Z", 15)), now);
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"));
        let spec = taken.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time.as_ref().unwrap().0, now);
        let renewed = next_lease(&cfg, Some(&taken), at("2026-11-22T03:00:22Z"));
        let spec = renewed.spec.as_ref().unwrap();
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time.as_ref().unwrap().0, now);
        let created = next_lease(&cfg, None, now);
        assert_eq!(created.spec.unwrap().lease_transitions, Some(0));
        assert_eq!(created.metadata.namespace.as_deref(), Some("sidemesh"));
    }
}
