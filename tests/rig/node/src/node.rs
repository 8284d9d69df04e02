//! The Node object: registration, status and the heartbeat (Lease renewal
//! plus periodic status refresh) that keeps the node lifecycle controller
//! from marking it NotReady.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::envvars::LOOPBACK_IP;
use crate::retry::{Backoff, is_conflict, is_not_found};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// Status refresh period; well under the controller's 40 s grace period.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(20);
pub const KUBELET_VERSION: &str = "v1.37.2";

/// What the node advertises.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub kubelet_port: u16,
}

pub fn labels(name: &str) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("baker.io/rig-node", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

pub fn system_info() -> NodeSystemInfo {
    let machine_id = read_trimmed("/etc/machine-id");
    let product_uuid = read_trimmed("/sys/class/dmi/id/product_uuid");
    NodeSystemInfo {
        architecture: "amd64".into(),
        operating_system: "linux".into(),
        kubelet_version: KUBELET_VERSION.into(),
        kube_proxy_version: String::new(),
        container_runtime_version: format!("baker-rig-node://{}", env!("CARGO_PKG_VERSION")),
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
        system_uuid: if product_uuid.is_empty() {
            machine_id.clone()
        } else {
            product_uuid
        },
        machine_id,
        os_image: os_image(),
        ..Default::default()
    }
}

fn resources() -> BTreeMap<String, Quantity> {
    [
        ("cpu", "8"),
        ("memory", "32Gi"),
        ("pods", "110"),
        ("ephemeral-storage", "100Gi"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
    .collect()
}

fn node_condition(
    existing: &[NodeCondition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> NodeCondition {
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(last_transition_time),
    }
}

/// The full status the node reports (conditions keep their transition
/// times while unchanged).
pub fn node_status(cfg: &NodeConfig, existing: &[NodeCondition], now: Timestamp) -> NodeStatus {
    NodeStatus {
        conditions: Some(vec![
            node_condition(
                existing,
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                now,
            ),
            node_condition(
                existing,
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                now,
            ),
            node_condition(
                existing,
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                now,
            ),
            node_condition(
                existing,
                "Ready",
                "True",
                "KubeletReady",
                "baker-rig-node is posting ready status",
                now,
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: LOOPBACK_IP.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: cfg.name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(cfg.kubelet_port),
            }),
        }),
        capacity: Some(resources()),
        allocatable: Some(resources()),
        node_info: Some(system_info()),
        ..Default::default()
    }
}

async fn patch_status(api: &Api<Node>, cfg: &NodeConfig, node: &Node) -> Result<Node, kube::Error> {
    let existing = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = node_status(cfg, &existing, Timestamp::now());
    api.patch_status(
        &cfg.name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
}

/// Creates the Node (or updates its labels) and posts its status.
async fn register_once(api: &Api<Node>, cfg: &NodeConfig) -> Result<Node, kube::Error> {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            labels: Some(labels(&cfg.name)),
            ..Default::default()
        },
        ..Default::default()
    };
    let node = match api.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(e) if is_conflict(&e) => {
            api.patch(
                &cfg.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": labels(&cfg.name) } })),
            )
            .await?
        }
        Err(e) => return Err(e),
    };
    patch_status(api, cfg, &node).await
}

/// Registers the node, retrying until the apiserver accepts it.
pub async fn register(client: &Client, cfg: &NodeConfig) -> Node {
    let api: Api<Node> = Api::all(client.clone());
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        match register_once(&api, cfg).await {
            Ok(n) => {
                tracing::info!(node = %cfg.name, "node registered");
                return n;
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering node; retrying");
                backoff.wait().await;
            }
        }
    }
}

fn lease_spec(cfg: &NodeConfig, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(cfg.name.clone()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    }
}

async fn renew_lease(client: &Client, cfg: &NodeConfig, node: &Node) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = Timestamp::now();
    let patch = json!({ "spec": lease_spec(cfg, now) });
    match api
        .patch(&cfg.name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: node.metadata.uid.clone().map(|uid| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: cfg.name.clone(),
                            uid,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    acquire_time: Some(MicroTime(now)),
                    ..lease_spec(cfg, now)
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Renews the Lease every 10 s and refreshes the node status every 20 s,
/// re-registering the Node if it was deleted. Runs forever.
pub async fn heartbeat(client: Client, cfg: NodeConfig, mut node: Node) {
    let api: Api<Node> = Api::all(client.clone());
    let mut ticker = tokio::time::interval(LEASE_RENEW_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        if let Err(e) = renew_lease(&client, &cfg, &node).await {
            tracing::warn!(error = %e, "renewing node lease");
        }
        if last_status.elapsed() + Duration::from_millis(500) >= STATUS_INTERVAL {
            match patch_status(&api, &cfg, &node).await {
                Ok(n) => {
                    node = n;
                    last_status = tokio::time::Instant::now();
                }
                Err(e) if is_not_found(&e) => {
                    tracing::warn!("node object is gone; registering again");
                    node = register(&client, &cfg).await;
                    last_status = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "updating node status"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shape() {
        let cfg = NodeConfig {
            name: "rig".into(),
            kubelet_port: 10250,
        };
        let t0 = Timestamp::from_second(100).unwrap();
        let s = node_status(&cfg, &[], t0);
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready.status, "True");
        assert_eq!(s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port, 10250);
        assert_eq!(s.capacity.as_ref().unwrap()["memory"].0, "32Gi");
        let info = s.node_info.unwrap();
        assert_eq!(info.kubelet_version, "v1.37.2");
        assert!(info.container_runtime_version.starts_with("baker-rig-node://"));

        // A later heartbeat keeps the transition time, moves the heartbeat.
        let t1 = Timestamp::from_second(200).unwrap();
        let s2 = node_status(&cfg, s.conditions.as_deref().unwrap(), t1);
        let ready2 = s2
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready2.last_transition_time, Some(Time(t0)));
        assert_eq!(ready2.last_heartbeat_time, Some(Time(t1)));

        // After the controller marked it Unknown, the transition moves.
        let unknown = NodeCondition {
            type_: "Ready".into(),
            status: "Unknown".into(),
            last_transition_time: Some(Time(t0)),
            ..Default::default()
        };
        let s3 = node_status(&cfg, &[unknown], t1);
        let ready3 = s3
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready3.last_transition_time, Some(Time(t1)));
    }

    #[test]
    fn labels_present() {
        let l = labels("rig");
        assert_eq!(l["kubernetes.io/hostname"], "rig");
        assert_eq!(l["baker.io/rig-node"], "true");
    }
}
