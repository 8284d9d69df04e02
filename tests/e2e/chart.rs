//! The Helm chart `charts/baker` on the rig: it lints and renders cleanly, its RBAC is least
//! privilege (checked with `kubectl auth can-i`), and an operator authenticated only with the
//! chart's ServiceAccount token, run as the chart's Deployment specifies, bakes an image end to end
//! (two of them: one leads, the other stands by). What needs no rig (its CRDs, pinned versions and
//! RBAC comments) is checked in `src/api/drift_tests.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use baker::api::{Bake, BakePhase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde::Deserialize;

use crate::support::bake::*;
use crate::support::ship::*;
use crate::support::{CmdOutput, Rig, TestNamespace, chart_dir, rig};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn chart_lints_strictly_and_renders_without_warnings_or_wildcards() -> Result<()> {
    let rig = rig();
    let dir = chart_dir();
    let lint = rig
        .helm(["lint", "--strict", &dir.to_string_lossy()])
        .await?
        .ok()?;
    assert!(!lint.stdout.contains("[WARNING]"), "{}", lint.stdout);
    let rendered = rig
        .helm([
            "template",
            "baker",
            &dir.to_string_lossy(),
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "bakeNamespaces={team-a,team-b}",
        ])
        .await?
        .ok()?;
    assert!(rendered.stderr.trim().is_empty(), "{}", rendered.stderr);
    let mut roles = 0;
    for doc in serde_yaml::Deserializer::from_str(&rendered.stdout) {
        let value = serde_yaml::Value::deserialize(doc)?;
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        if kind != "Role" && kind != "ClusterRole" {
            continue;
        }
        roles += 1;
        for rule in value
            .get("rules")
            .and_then(|r| r.as_sequence())
            .into_iter()
            .flatten()
        {
            for key in ["verbs", "resources", "apiGroups", "resourceNames"] {
                for item in rule.get(key).and_then(|v| v.as_sequence()).into_iter().flatten() {
                    assert_ne!(item.as_str(), Some("*"), "wildcard in {kind}: {rule:?}");
                }
            }
        }
    }
    // The ClusterRole, one Role per bake namespace, and the leader-election Role.
    assert_eq!(roles, 4, "{}", rendered.stdout);
    // Without a bake namespace the chart refuses to render.
    let none = rig
        .helm([
            "template",
            "baker",
            &dir.to_string_lossy(),
            "--set",
            "bakeNamespaces=null",
        ])
        .await?;
    assert!(!none.success(), "rendered without bakeNamespaces");
    Ok(())
}

async fn can_i(rig: &Rig, who: &str, args: &[&str]) -> Result<bool> {
    let mut full = vec!["auth", "can-i", "--as", who];
    full.extend_from_slice(args);
    let out = rig.kubectl(&full).await?;
    Ok(out.stdout.trim() == "yes")
}

/// The Secret, in the release namespace, the chart's `aws.operatorCredentialsSecret` names.
const OPERATOR_AWS_SECRET: &str = "operator-aws";

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn two_operators_run_as_the_chart_deployment_says_with_only_its_service_account_token_one_bakes()
-> Result<()> {
    // The namespace where bakes are allowed, and the release's namespace.
    let (rig, client, bake_ns, template) = namespace_with_template("chart-bakes", "").await?;
    let release_ns = TestNamespace::new(&client, "chart-rel").await?;
    let other_ns = TestNamespace::new(&client, "chart-other").await?;
    let release = release_ns.name().to_string();
    release_ns
        .api::<Secret>()
        .create(&PostParams::default(), &aws_secret(rig, OPERATOR_AWS_SECRET)?)
        .await?;
    let set = [
        // The rig's node runs pods as host processes and cannot run the operator image: the
        // test starts the Deployment's container itself, twice, from the installed pod template.
        "replicaCount=0".to_string(),
        "createBakeNamespaces=false".to_string(),
        format!("bakeNamespaces={{{}}}", bake_ns.name()),
        // Only this test's namespace: other tests run their own operators beside it.
        format!("watchNamespace={}", bake_ns.name()),
        format!("aws.region={}", rig.region()),
        format!("aws.ec2Endpoint={}", rig.ec2_endpoint()),
        format!("aws.credentialsSecret={CREDENTIALS_SECRET}"),
        format!("aws.operatorCredentialsSecret={OPERATOR_AWS_SECRET}"),
        "leaderElection.leaseSeconds=6".to_string(),
    ];
    let mut args = vec![
        "install".to_string(),
        release.clone(),
        chart_dir().to_string_lossy().to_string(),
        "--namespace".into(),
        release.clone(),
        "--wait".into(),
        "--timeout".into(),
        "60s".into(),
    ];
    for s in set {
        args.extend(["--set".to_string(), s]);
    }
    let install = rig.helm(&args).await?;
    let result = match check_installed(
        rig,
        &bake_ns,
        &template,
        &release_ns,
        &other_ns,
        &release,
        install,
    )
    .await
    {
        // The Bakes go while the operators still run, so their cleanup finalizers are honoured.
        Ok(operators) => {
            let finished = finish(bake_ns).await;
            drop(operators);
            finished
        }
        Err(e) => Err(e),
    };
    rig.helm(["uninstall", &release, "--namespace", &release]).await?;
    result?;
    release_ns.cleanup().await?;
    other_ns.cleanup().await
}

async fn check_installed(
    rig: &Rig,
    bake_ns: &TestNamespace,
    template: &str,
    release_ns: &TestNamespace,
    other_ns: &TestNamespace,
    release: &str,
    install: CmdOutput,
) -> Result<Vec<Operator>> {
    install.ok()?;
    let fullname = format!("{release}-baker");
    let sa = format!("system:serviceaccount:{}:{fullname}", release_ns.name());
    let (bakes, release_n, other) = (bake_ns.name(), release_ns.name(), other_ns.name());

    // What the chart grants...
    assert!(can_i(rig, &sa, &["create", "pods", "-n", bakes]).await?);
    assert!(can_i(rig, &sa, &["create", "configmaps", "-n", bakes]).await?);
    assert!(
        can_i(
            rig,
            &sa,
            &["patch", "bakes.baker.io", "--subresource=status", "-n", other]
        )
        .await?
    );
    assert!(
        can_i(
            rig,
            &sa,
            &["update", &format!("leases/{fullname}"), "-n", release_n]
        )
        .await?
    );
    // ... and what it does not.
    for ns in [bakes, release_n, other, "kube-system"] {
        for verb in ["get", "list", "watch"] {
            assert!(
                !can_i(rig, &sa, &[verb, "secrets", "-n", ns]).await?,
                "{verb} secrets in {ns}"
            );
        }
    }
    assert!(!can_i(rig, &sa, &["list", "secrets", "--all-namespaces"]).await?);
    for ns in [release_n, other, "kube-system", "default"] {
        assert!(
            !can_i(rig, &sa, &["create", "pods", "-n", ns]).await?,
            "create pods in {ns}"
        );
        assert!(
            !can_i(rig, &sa, &["delete", "pods", "-n", ns]).await?,
            "delete pods in {ns}"
        );
    }
    assert!(!can_i(rig, &sa, &["update", "leases/other", "-n", release_n]).await?);
    assert!(!can_i(rig, &sa, &["delete", "bakes.baker.io", "-n", other]).await?);
    assert!(!can_i(rig, &sa, &["create", "clusterroles"]).await?);

    // A token of the chart's ServiceAccount (TokenRequest), and two operators using only it, each
    // run as the installed Deployment's operator container would be.
    let token = rig
        .kubectl(["create", "token", &fullname, "-n", release_n, "--duration", "1h"])
        .await?
        .ok()?
        .stdout
        .trim()
        .to_string();
    let dir = tempfile::tempdir()?;
    let kubeconfig = kubeconfig_with_token(rig, &token, dir.path())?;
    let deployment = release_ns.api::<Deployment>().get(&fullname).await?;
    let container = deployment
        .spec
        .template
        .spec
        .and_then(|p| p.containers.into_iter().find(|c| c.name == "operator"))
        .context("the Deployment has no operator container")?;
    let secrets = release_ns.api::<Secret>();
    let mut operators = Vec::new();
    for replica in ["a", "b"] {
        let pod = format!("{fullname}-{replica}");
        let operator =
            Operator::start_as_container(rig, &pod, release_n, &container, &secrets, &kubeconfig).await?;
        wait_for_status(&operator.http, "/readyz", 200, Duration::from_secs(60))
            .await
            .with_context(|| operator.log())?;
        operators.push((pod, operator));
    }
    let leases = release_ns.api::<Lease>();
    let leader = leases
        .get(&fullname)
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .context("no lease holder")?;
    assert!(
        operators.iter().any(|(pod, _)| *pod == leader),
        "lease held by {leader}"
    );

    create_bake(
        bake_ns,
        &bake_yaml("chart-1.0.0", template, "chart", "1.0.0", "hvm"),
    )
    .await?;
    let logs = || {
        operators
            .iter()
            .map(|(pod, o)| format!("--- {pod}\n{}", o.log()))
            .collect::<String>()
    };
    let bake = wait_for_phase(
        &bake_ns.api::<Bake>(),
        "chart-1.0.0",
        BakePhase::Succeeded,
        BAKE_TIMEOUT,
    )
    .await
    .with_context(logs)?;
    assert!(bake.status.and_then(|s| s.ami_id).is_some());
    for (pod, operator) in &operators {
        let log = operator.log();
        // An API refusal reads "Forbidden" (reason) / "forbidden" (message); a bare "403" could
        // be part of a timestamp.
        assert!(!log.to_lowercase().contains("forbidden"), "{pod}:\n{log}");
        // The chart asks for JSON logs: every line is one JSON object.
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("{pod}: not a JSON log line: {line}"))?;
        }
        // Only the lease holder reconciled.
        assert_eq!(
            log.contains("launched bake pod"),
            *pod == leader,
            "{pod} (leader {leader}):\n{log}"
        );
    }
    assert_eq!(event_reporters(bake_ns).await?, BTreeSet::from([leader.clone()]));
    Ok(operators.into_iter().map(|(_, o)| o).collect())
}
