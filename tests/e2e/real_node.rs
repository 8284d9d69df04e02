//! Baker on the rig's real node (`tests/rig/real-node.sh`): a kubelet and containerd running its
//! images with runc, so the pod specs' security contexts are enforced rather than reported as
//! unsupported. The chart is installed as a user installs it (two replicas from the operator
//! image, leader election), a Bake is baked in a real container and its log followed with
//! `kubectl logs -f`, and a chroot template's pod is checked to be privileged with the host's
//! `/dev` in the container runtime's own spec of it.
//!
//! `make test` starts the real node after building the images; by hand: `make images`, then
//! `tests/rig/rig.sh real-node` on a running rig.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use baker::api::{Bake, BakePhase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, PostParams};
use serde_json::Value;

use crate::support::bake::*;
use crate::support::{Rig, TestNamespace, chart_dir, random_suffix, try_wait_until, wait_for_object};

/// What the rig says of its real node; a failure names how to start it.
struct RealNode {
    name: String,
    /// The taint (and label) that keeps other pods off it.
    taint: String,
    image_tag: String,
    /// moto, as pods on the node reach it.
    ec2_endpoint: String,
    containerd_socket: String,
}

impl RealNode {
    fn of(rig: &Rig) -> Result<RealNode> {
        let get = |name: &str| -> Result<String> {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .with_context(|| {
                    format!(
                        "the rig has no real node ({name} is unset): `make test` starts it; by hand, \
                     `make images` then `tests/rig/rig.sh real-node`, then source {}/env",
                        rig.dir().display()
                    )
                })
        };
        Ok(RealNode {
            name: get("BAKER_RIG_REAL_NODE_NAME")?,
            taint: get("BAKER_RIG_REAL_NODE_TAINT")?,
            image_tag: get("BAKER_RIG_REAL_NODE_IMAGE_TAG")?,
            ec2_endpoint: get("BAKER_RIG_POD_EC2_ENDPOINT")?,
            containerd_socket: get("BAKER_RIG_CONTAINERD_SOCKET")?,
        })
    }

    /// A BakeTemplate's `pod:` placement onto this node (two-space indented spec lines).
    fn placement(&self) -> String {
        format!(
            "  pod:\n    nodeSelector: {{\"{t}\": \"true\"}}\n    tolerations: [{{key: \"{t}\", operator: Exists}}]",
            t = self.taint
        )
    }

    /// The OCI runtime spec containerd made for the container of `pod` (`containerd://<id>`).
    async fn runtime_spec(&self, rig: &Rig, pod: &Pod) -> Result<Value> {
        let id = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.container_id.as_deref())
            .and_then(|id| id.strip_prefix("containerd://"))
            .context("the pod's container has no containerd id")?;
        let mut cmd = rig.command(rig.bin_dir().join("ctr"));
        cmd.args([
            "-a",
            &self.containerd_socket,
            "-n",
            "k8s.io",
            "containers",
            "info",
            id,
        ]);
        let out = crate::support::run(cmd).await?.ok()?;
        let info: Value = serde_json::from_str(&out.stdout)?;
        info.get("Spec")
            .cloned()
            .context("ctr containers info shows no Spec")
    }
}

/// The bake pod of `bake` once its container has started (running or ended).
async fn started_bake_pod(ns: &TestNamespace, bake: &str) -> Result<Pod> {
    wait_for_object(
        &ns.api::<Pod>(),
        &format!("bake-{bake}"),
        Duration::from_secs(120),
        "the bake pod to start its container",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        },
    )
    .await
}

/// A node reports what it cannot enforce as `Unsupported` Events; the real node has none.
async fn assert_no_unsupported(ns: &TestNamespace) -> Result<()> {
    let unsupported = event_notes(ns, "Unsupported").await?;
    ensure!(
        unsupported.is_empty(),
        "the real node supports the whole pod spec: {unsupported:?}"
    );
    Ok(())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig's real node: make test"]
async fn the_chart_runs_two_operators_from_the_image_on_the_real_node_and_one_bakes_in_a_restricted_container()
-> Result<()> {
    let rig = crate::support::rig();
    let node = RealNode::of(rig)?;
    let (rig, client, bake_ns, template) = namespace_with_template("rn-bakes", &node.placement()).await?;
    let release_ns = TestNamespace::new(&client, "rn-rel").await?;
    let release = release_ns.name().to_string();
    release_ns
        .api::<Secret>()
        .create(&PostParams::default(), &aws_secret(rig, "operator-aws")?)
        .await?;
    let key = node.taint.replace('.', "\\.");
    let set = [
        "image.repository=localhost/baker-operator".to_string(),
        format!("image.tag={}", node.image_tag),
        "image.pullPolicy=Never".to_string(),
        format!("bakeImage=localhost/baker-bake:{}", node.image_tag),
        "replicaCount=2".to_string(),
        format!("tolerations[0].key={}", node.taint),
        "tolerations[0].operator=Exists".to_string(),
        "createBakeNamespaces=false".to_string(),
        format!("bakeNamespaces={{{}}}", bake_ns.name()),
        format!("watchNamespace={}", bake_ns.name()),
        format!("aws.region={}", rig.region()),
        // The operator pods and their bake pods both reach moto as the node's pods do.
        format!("aws.ec2Endpoint={}", node.ec2_endpoint),
        format!("aws.ssmEndpoint={}", node.ec2_endpoint),
        format!("aws.credentialsSecret={CREDENTIALS_SECRET}"),
        "aws.operatorCredentialsSecret=operator-aws".to_string(),
        "leaderElection.leaseSeconds=6".to_string(),
    ];
    let mut args = vec![
        "install".to_string(),
        release.clone(),
        chart_dir().to_string_lossy().to_string(),
        "--namespace".into(),
        release.clone(),
    ];
    for s in set {
        args.extend(["--set".to_string(), s]);
    }
    // A label value is a string; `--set` would make `true` a boolean.
    args.extend(["--set-string".to_string(), format!("nodeSelector.{key}=true")]);
    rig.helm(&args).await?.ok()?;

    let result = installed(rig, &node, &bake_ns, &template, &release_ns, &release).await;
    // The Bakes go while the operators still run, so their finalizers are honoured.
    let finished = finish(bake_ns).await;
    rig.helm(["uninstall", &release, "--namespace", &release, "--wait"])
        .await?
        .ok()?;
    result?;
    finished?;
    release_ns.cleanup().await
}

async fn installed(
    rig: &Rig,
    node: &RealNode,
    bake_ns: &TestNamespace,
    template: &str,
    release_ns: &TestNamespace,
    release: &str,
) -> Result<()> {
    let fullname = format!("{release}-baker");
    // Both replicas run from the image on the real node and pass their readiness probes (which
    // the kubelet sends to the pods' own addresses).
    let deployment = wait_for_object(
        &release_ns.api::<Deployment>(),
        &fullname,
        Duration::from_secs(120),
        "both operator replicas Ready",
        |d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
    )
    .await;
    let pods = release_ns.api::<Pod>().list(&ListParams::default()).await?;
    let describe = || {
        pods.items
            .iter()
            .map(|p| format!("{:?}: {:?}\n", p.metadata.name, p.status))
            .collect::<String>()
    };
    deployment.with_context(describe)?;
    let names: Vec<String> = pods
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    ensure!(names.len() == 2, "two operator pods: {names:?}");
    for pod in &pods.items {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        ensure!(
            spec.node_name.as_deref() == Some(node.name.as_str()),
            "{:?} runs on {:?}",
            pod.metadata.name,
            spec.node_name
        );
    }
    let leader = try_wait_until(Duration::from_secs(60), "a lease holder", || async {
        Ok(release_ns
            .api::<Lease>()
            .get_opt(&fullname)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity))
    })
    .await?;
    ensure!(names.contains(&leader), "lease held by {leader}, pods {names:?}");

    let name = format!("rn-{}", random_suffix());
    create_bake(bake_ns, &bake_yaml(&name, template, "realnode", "1.0.0", "hvm")).await?;
    let pod = started_bake_pod(bake_ns, &name).await?;
    let pod_name = pod.metadata.name.clone().context("unnamed pod")?;
    // `kubectl logs -f` follows packer's output from the container and ends with it.
    let follow = rig.kubectl(["logs", "-f", "-n", bake_ns.name(), &pod_name]);
    let logs = tokio::time::timeout(BAKE_TIMEOUT, follow)
        .await
        .context("kubectl logs -f did not end with the container")??
        .ok()?;
    ensure!(
        logs.stdout.contains("Builds finished") || logs.stdout.contains("AMIs were created"),
        "packer's output in kubectl logs -f:\n{}",
        logs.stdout
    );
    let bake = wait_for_phase(&bake_ns.api::<Bake>(), &name, BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let ami = bake.status.and_then(|s| s.ami_id).context("no amiId")?;
    ensure!(ami.starts_with("ami-"), "{ami}");

    // The runtime enforced the restricted security context: its spec of the container says so.
    let pod = bake_ns.api::<Pod>().get(&pod_name).await?;
    let spec = node.runtime_spec(rig, &pod).await?;
    let process = &spec["process"];
    ensure!(process["user"]["uid"] == 65532, "uid: {}", process["user"]);
    ensure!(process["noNewPrivileges"] == true, "noNewPrivileges: {process}");
    ensure!(
        strings(process["capabilities"].get("effective")).is_empty(),
        "capabilities: {}",
        process["capabilities"]
    );
    ensure!(spec["root"]["readonly"] == true, "root: {}", spec["root"]);
    ensure!(
        spec["linux"].get("seccomp").is_some(),
        "a seccomp profile (RuntimeDefault): {}",
        spec["linux"]
    );
    assert_no_unsupported(bake_ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig's real node: make test"]
async fn a_chroot_templates_bake_pod_runs_privileged_with_the_hosts_dev_on_the_real_node() -> Result<()> {
    let rig = crate::support::rig();
    let node = RealNode::of(rig)?;
    let (rig, client, ns) = namespace("rn-chroot").await?;
    let template = format!("{}-chroot", ns.name());
    // The template names the endpoint its pods reach moto at; the operator runs on the host.
    apply_template(
        &client,
        &format!(
            "apiVersion: baker.io/v1alpha1
kind: BakeTemplate
metadata:
  name: {template}
spec:
  builder: amazon-chroot
  region: us-east-1
  ec2Endpoint: {endpoint}
  source:
    filter:
      owners: [self]
      name: \"baker-rig-source-{{virtualizationType}}-*\"
{placement}
",
            endpoint = node.ec2_endpoint,
            placement = node.placement()
        ),
    )
    .await?;
    let image = format!("localhost/baker-bake:{}", node.image_tag);
    let _operator = Operator::start_with(rig, ns.name(), &["--packer-image", &image], &[]).await?;
    let name = format!("chroot-{}", random_suffix());
    create_bake(&ns, &bake_yaml(&name, &template, "chroot", "1.0.0", "hvm")).await?;
    let pod = started_bake_pod(&ns, &name).await?;
    ensure!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name.as_str()),
        "the chroot pod runs on the real node"
    );
    let spec = node.runtime_spec(rig, &pod).await?;
    let process = &spec["process"];
    ensure!(process["user"]["uid"] == 0, "root: {}", process["user"]);
    let effective = strings(process["capabilities"].get("effective"));
    ensure!(
        effective.iter().any(|c| c == "CAP_SYS_ADMIN") && effective.len() > 30,
        "privileged: every capability, {effective:?}"
    );
    let dev = spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["destination"] == "/dev")
        .context("no /dev mount")?;
    ensure!(
        dev["source"] == "/dev" && strings(dev.get("options")).iter().any(|o| o.contains("bind")),
        "the host's /dev, bind-mounted: {dev}"
    );
    assert_no_unsupported(&ns).await?;
    finish(ns).await
}
