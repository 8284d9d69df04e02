//! The Helm chart `charts/baker`: it lints and renders cleanly, its CRDs are the generated ones,
//! its RBAC is least privilege (checked with `kubectl auth can-i` on the rig), and an operator
//! authenticated only with the chart's ServiceAccount token bakes an image end to end.

mod bake_support;
mod ship_support;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bake_support::*;
use baker::api::{Bake, BakePhase};
use serde::Deserialize;
use ship_support::*;
use support::{CmdOutput, Rig, TestNamespace, rig};

const BAKE_TIMEOUT: Duration = Duration::from_secs(180);

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/baker")
}

async fn helm<I, S>(rig: &Rig, args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = rig.command(rig.bin_dir().join("helm"));
    cmd.env("KUBECONFIG", rig.kubeconfig_path()).args(args);
    support::run(cmd).await
}

#[test]
fn chart_crds_are_the_generated_crds_byte_for_byte() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<_> = std::fs::read_dir(root.join("crds"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut chart: Vec<_> = std::fs::read_dir(chart_dir().join("crds"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    chart.sort();
    assert_eq!(
        names, chart,
        "charts/baker/crds must hold exactly the files of crds/"
    );
    for name in names {
        let generated = std::fs::read(root.join("crds").join(&name))?;
        let copied = std::fs::read(chart_dir().join("crds").join(&name))?;
        assert!(
            generated == copied,
            "charts/baker/crds/{} differs from crds/: run `make chart-crds`",
            name.to_string_lossy()
        );
    }
    Ok(())
}

#[test]
fn every_rbac_rule_of_the_chart_has_a_comment_naming_its_code() -> Result<()> {
    for file in [
        "clusterrole.yaml",
        "role-bake-namespaces.yaml",
        "role-leader-election.yaml",
    ] {
        let text = std::fs::read_to_string(chart_dir().join("templates").join(file))?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                let above = lines[..i].last().map(|l| l.trim_start()).unwrap_or("");
                assert!(above.starts_with('#'), "{file}:{}: rule without a comment", i + 1);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_lints_strictly_and_renders_without_warnings_or_wildcards() -> Result<()> {
    let rig = rig();
    let dir = chart_dir();
    let lint = helm(rig, ["lint", "--strict", &dir.to_string_lossy()])
        .await?
        .ok()?;
    assert!(!lint.stdout.contains("[WARNING]"), "{}", lint.stdout);
    let rendered = helm(
        rig,
        [
            "template",
            "baker",
            &dir.to_string_lossy(),
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "bakeNamespaces={team-a,team-b}",
        ],
    )
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
    let none = helm(
        rig,
        [
            "template",
            "baker",
            &dir.to_string_lossy(),
            "--set",
            "bakeNamespaces=null",
        ],
    )
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

#[tokio::test(flavor = "multi_thread")]
async fn operator_with_only_the_chart_service_account_token_bakes_and_cannot_reach_beyond_its_grants()
-> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    // The namespace where bakes are allowed, and the release's namespace.
    let bake_ns = namespace(rig, &client, "chart-bakes").await?;
    let release_ns = TestNamespace::new(&client, "chart-rel").await?;
    let other_ns = TestNamespace::new(&client, "chart-other").await?;
    let release = release_ns.name().to_string();
    let install = helm(
        rig,
        [
            "install",
            &release,
            &chart_dir().to_string_lossy(),
            "--namespace",
            &release,
            "--set",
            "replicaCount=0",
            "--set",
            "createBakeNamespaces=false",
            "--set",
            &format!("bakeNamespaces={{{}}}", bake_ns.name()),
            "--wait",
            "--timeout",
            "60s",
        ],
    )
    .await?;
    let result =
        match check_installed(rig, &client, &bake_ns, &release_ns, &other_ns, &release, install).await {
            // The Bakes go while the operator still runs, so their cleanup finalizers are honoured.
            Ok(operator) => {
                let finished = finish(bake_ns).await;
                drop(operator);
                finished
            }
            Err(e) => Err(e),
        };
    helm(rig, ["uninstall", &release, "--namespace", &release]).await?;
    result?;
    release_ns.cleanup().await?;
    other_ns.cleanup().await
}

async fn check_installed(
    rig: &Rig,
    client: &kube::Client,
    bake_ns: &TestNamespace,
    release_ns: &TestNamespace,
    other_ns: &TestNamespace,
    release: &str,
    install: CmdOutput,
) -> Result<Baker> {
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

    // A token of the chart's ServiceAccount (TokenRequest), and an operator using only it.
    let token = rig
        .kubectl(["create", "token", &fullname, "-n", release_n, "--duration", "1h"])
        .await?
        .ok()?
        .stdout
        .trim()
        .to_string();
    let dir = tempfile::tempdir()?;
    let kubeconfig = kubeconfig_with_token(rig, &token, dir.path())?;
    let operator = Baker::start(
        rig,
        "chart-sa",
        bakes,
        &kubeconfig,
        &[
            "--leader-election",
            "--leader-election-namespace",
            release_n,
            "--leader-election-name",
            &fullname,
            "--bake-namespaces",
            bakes,
        ],
        &[],
    )
    .await?;
    wait_for_status(&operator.http, "/readyz", 200, Duration::from_secs(60))
        .await
        .with_context(|| operator.log())?;

    let template = format!("{}-ebs", bakes);
    apply_template(client, &rig_template(&template, "")).await?;
    create_bake(
        bake_ns,
        &bake_yaml("chart-1.0.0", &template, "chart", "1.0.0", "hvm"),
    )
    .await?;
    let bake = wait_for_phase(
        &bake_ns.api::<Bake>(),
        "chart-1.0.0",
        BakePhase::Succeeded,
        BAKE_TIMEOUT,
    )
    .await
    .with_context(|| operator.log())?;
    assert!(bake.status.and_then(|s| s.ami_id).is_some());
    assert!(!operator.log().contains("403"), "{}", operator.log());
    Ok(operator)
}
