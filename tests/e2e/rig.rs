//! The rig itself: what the operator's tests and the demo rely on. Needs `make rig-up`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{Filter, ImageState};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::json;

use crate::support::*;

/// The local node runs a container's command on the host and ignores its image.
const IMAGE: &str = "busybox:stable";

fn host_pod(name: &str, script: &str, grace_seconds: Option<i64>) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace_seconds,
            "containers": [{ "name": "main", "image": IMAGE, "command": ["sh", "-c", script] }],
        },
    }))
    .expect("a valid pod")
}

/// Runs `script` in the host pod `name` in a fresh namespace `<prefix>-<random>`, and returns the
/// namespace and the pod once it ended.
async fn pod_ended(prefix: &str, name: &str, script: &str) -> Result<(TestNamespace, Pod)> {
    let client = rig().client().await?;
    let ns = TestNamespace::new(&client, prefix).await?;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &host_pod(name, script, None))
        .await?;
    let ended = &["Succeeded", "Failed"];
    let pod = wait_for_pod_phase(&pods, name, ended, Duration::from_secs(90)).await?;
    Ok((ns, pod))
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn apiserver_reports_v1_37_and_node_is_ready() -> Result<()> {
    let rig = rig();
    let out = rig.kubectl(["version", "-o", "json"]).await?.ok()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("kubectl version -o json")?;
    let server = v["serverVersion"]["gitVersion"].as_str().unwrap_or_default();
    assert!(
        server.starts_with("v1.37."),
        "kubectl version reports server {server:?}, want v1.37.x"
    );

    let info = rig.client().await?.apiserver_version().await?;
    assert_eq!(
        (info.major.as_str(), info.minor.as_str()),
        ("1", "37"),
        "discovery version {info:?}"
    );

    let node = rig.node_name();
    wait_until(
        Duration::from_secs(60),
        &format!("`kubectl get nodes` to show {node} Ready"),
        || async move {
            let out = rig.kubectl(["get", "nodes", "--no-headers"]).await.ok()?;
            out.stdout
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .any(|f| f.first() == Some(&node) && f.get(1) == Some(&"Ready"))
                .then_some(())
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn rbac_refuses_service_account_until_role_grants_it() -> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = TestNamespace::new(&client, "rbac").await?;
    let lp = ListParams::default();

    // The admin (system:masters) may do anything, anywhere.
    let can = rig
        .kubectl(["auth", "can-i", "*", "*", "--all-namespaces"])
        .await?;
    assert_eq!(can.stdout.trim(), "yes", "admin `auth can-i '*' '*'`: {can:?}");
    Api::<Secret>::all(client.clone())
        .list(&lp)
        .await
        .context("admin lists secrets")?;

    // A fresh ServiceAccount, with a token from the TokenRequest API.
    let sas: Api<ServiceAccount> = ns.api();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("probe".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create(&PostParams::default(), &sa).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request("probe", &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("TokenRequest without a token")?;
    let sa_client = rig.client_with_token(&token).await?;
    let sa_pods: Api<Pod> = Api::namespaced(sa_client.clone(), ns.name());

    match sa_pods.list(&lp).await {
        Err(kube::Error::Api(s)) if s.is_forbidden() => {}
        other => bail!("a ServiceAccount without roles listed pods: want 403, got {other:?}"),
    }

    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "pod-reader" },
        "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }],
    }))?;
    ns.api::<Role>().create(&PostParams::default(), &role).await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "probe-reads-pods" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "probe", "namespace": ns.name() }],
    }))?;
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;

    let sa_pods = &sa_pods;
    let lp = &lp;
    wait_until(
        Duration::from_secs(30),
        "the Role to let the ServiceAccount list pods",
        || async move { sa_pods.list(lp).await.ok().map(|_| ()) },
    )
    .await?;

    // The Role grants exactly that: not secrets, not pods in another namespace.
    match Api::<Secret>::namespaced(sa_client.clone(), ns.name())
        .list(lp)
        .await
    {
        Err(kube::Error::Api(s)) if s.is_forbidden() => {}
        other => bail!("the ServiceAccount listed secrets: want 403, got {other:?}"),
    }
    match Api::<Pod>::namespaced(sa_client, "default").list(lp).await {
        Err(kube::Error::Api(s)) if s.is_forbidden() => {}
        other => bail!("the ServiceAccount listed pods in `default`: want 403, got {other:?}"),
    }
    ns.cleanup().await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn pod_succeeds_with_termination_message_and_logs() -> Result<()> {
    let rig = rig();
    let (ns, pod) = pod_ended("pod-ok", "hello", "echo hello; echo done > /dev/termination-log").await?;
    assert_eq!(pod_phase(&pod), Some("Succeeded"), "pod status: {:?}", pod.status);
    // No nodeName was given: the scheduler placed it.
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(rig.node_name())
    );
    let t = terminated(&pod).context("no terminated container state")?;
    assert_eq!(t.exit_code, 0);
    assert_eq!(
        t.message.as_deref().map(str::trim_end),
        Some("done"),
        "termination message"
    );

    let logs = rig.kubectl(["logs", "-n", ns.name(), "hello"]).await?.ok()?;
    assert_eq!(logs.stdout.trim_end(), "hello", "kubectl logs");
    ns.cleanup().await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn failing_pod_reports_exit_code() -> Result<()> {
    let (ns, pod) = pod_ended("pod-fail", "fails", "exit 3").await?;
    assert_eq!(pod_phase(&pod), Some("Failed"), "pod status: {:?}", pod.status);
    assert_eq!(
        terminated(&pod)
            .context("no terminated container state")?
            .exit_code,
        3
    );
    ns.cleanup().await
}

/// Whether a process with exactly this command line runs (a zombie's is empty, so it does not).
fn find_process(argv: &[&str]) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        (args.len() == argv.len() && args.iter().zip(argv).all(|(a, b)| *a == b.as_bytes())).then_some(pid)
    })
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn deleting_running_pod_stops_process_within_grace_period() -> Result<()> {
    const GRACE: u64 = 10;
    let client = rig().client().await?;
    let ns = TestNamespace::new(&client, "pod-delete").await?;
    let pods: Api<Pod> = ns.api();
    // An unusual duration marks this pod's process among everything else on the host.
    let seconds = (1_000_000 + u32::from_str_radix(&random_suffix(), 16)? % 1_000_000).to_string();
    let argv = ["sleep", seconds.as_str()];
    pods.create(
        &PostParams::default(),
        &host_pod("sleeper", &format!("exec sleep {seconds}"), Some(GRACE as i64)),
    )
    .await?;
    wait_for_pod_phase(&pods, "sleeper", &["Running"], Duration::from_secs(90)).await?;
    let argv = &argv;
    let pid = wait_until(
        Duration::from_secs(30),
        "the pod's `sleep` process on the host",
        || async move { find_process(argv) },
    )
    .await?;

    let start = Instant::now();
    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_until(
        Duration::from_secs(GRACE),
        &format!("process {pid} to stop within the pod's {GRACE}s grace period"),
        || async move { find_process(argv).is_none().then_some(()) },
    )
    .await?;
    eprintln!(
        "the pod's process stopped {:.1?} after the delete",
        start.elapsed()
    );
    wait_deleted(&pods, "sleeper", Duration::from_secs(30)).await?;
    ns.cleanup().await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn namespace_deletion_completes_and_owned_configmap_is_collected() -> Result<()> {
    let client = rig().client().await?;
    let ns = TestNamespace::new(&client, "gc").await?;
    let cms: Api<ConfigMap> = ns.api();
    let pp = PostParams::default();

    let owner = cms.create(&pp, &config_map("owner")).await?;
    let mut owned = config_map("owned");
    owned.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.context("owner without uid")?,
        ..Default::default()
    }]);
    cms.create(&pp, &owned).await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    wait_deleted(&cms, "owned", Duration::from_secs(60))
        .await
        .context("the garbage collector (kube-controller-manager) did not remove the owned ConfigMap")?;

    // A namespace with content goes away entirely: the namespace controller empties it first.
    cms.create(&pp, &config_map("content")).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(ns.name(), &DeleteParams::default()).await?;
    wait_deleted(&namespaces, ns.name(), Duration::from_secs(60))
        .await
        .context("namespace deletion did not complete (is kube-controller-manager running?)")?;
    ns.cleanup().await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn ec2_serves_seeded_source_images() -> Result<()> {
    let out = rig()
        .ec2()
        .describe_images()
        .owners("self")
        .filters(
            Filter::builder()
                .name("name")
                .values("baker-rig-source-*")
                .build(),
        )
        .send()
        .await?;
    let mut found: Vec<_> = out
        .images()
        .iter()
        .map(|i| {
            let tagged = i
                .tags()
                .iter()
                .any(|t| t.key() == Some("baker.io/rig") && t.value() == Some("source"));
            (
                i.name().unwrap_or_default().to_owned(),
                i.virtualization_type()
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
                i.root_device_type()
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
                tagged,
            )
        })
        .collect();
    found.sort();
    let want = |n: &str, v: &str| (n.to_owned(), v.to_owned(), "ebs".to_owned(), true);
    assert_eq!(
        found,
        vec![
            want("baker-rig-source-hvm-2026.11.0", "hvm"),
            want("baker-rig-source-paravirtual-2026.11.0", "paravirtual"),
        ]
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn packer_builds_ami_in_moto() -> Result<()> {
    let rig = rig();
    let dir = tempfile::tempdir()?;
    let name = format!("baker-rig-test-{}", random_suffix());
    let template = json!({
        "builders": [{
            "type": "amazon-ebs",
            "region": rig.region(),
            "custom_endpoint_ec2": rig.ec2_endpoint(),
            "skip_region_validation": true,
            "skip_metadata_api_check": true,
            "communicator": "none",
            "instance_type": "t3.micro",
            "source_ami_filter": {
                "filters": { "name": "baker-rig-source-hvm-*", "virtualization-type": "hvm" },
                "owners": ["self"],
                "most_recent": true,
            },
            "ami_name": name,
            "tags": { "baker.io/test": "true" },
        }],
    });
    std::fs::write(
        dir.path().join("template.json"),
        serde_json::to_vec_pretty(&template)?,
    )?;
    let mut cmd = rig.command("packer");
    cmd.current_dir(dir.path())
        .env("PACKER_CACHE_DIR", dir.path().join("packer-cache"))
        .args(["build", "-machine-readable", "-color=false", "template.json"]);
    let out = tokio::time::timeout(Duration::from_secs(120), run(cmd))
        .await
        .context("packer build took over 120s")??
        .ok()?;
    // Machine-readable lines: timestamp,target,type,data...; the artifact id is "region:ami-...".
    let image_id = out
        .stdout
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.get(2) == Some(&"artifact") && f.get(4) == Some(&"id"))
                .then(|| f.get(5).copied())
                .flatten()
        })
        .and_then(|id| id.split_once(':').map(|(_, ami)| ami.to_owned()))
        .with_context(|| format!("no artifact id in packer's output:\n{}", out.stdout))?;

    let images = rig.ec2().describe_images().image_ids(&image_id).send().await?;
    let image = images
        .images()
        .first()
        .with_context(|| format!("DescribeImages does not return {image_id}"))?;
    assert_eq!(image.name(), Some(name.as_str()));
    assert_eq!(image.state(), Some(&ImageState::Available));
    Ok(())
}

// Pure: the parser that finds the rig, so it runs without one.
#[test]
fn env_file_parser_handles_shell_quoting() {
    let vars = parse_env(
        "# comment\nexport A='x y'\nexport B='it'\\''s'\nexport PATH='/rig/bin'\":$A\"\nexport C=\"${B}!\"\n",
    )
    .unwrap();
    assert_eq!(vars["A"], "x y");
    assert_eq!(vars["B"], "it's");
    assert_eq!(vars["PATH"], "/rig/bin:x y");
    assert_eq!(vars["C"], "it's!");
}
