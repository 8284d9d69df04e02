//! Baker's images as `make images` builds them (mmdebstrap and umoci, no registry): they agree
//! with `images/*.Dockerfile`, and run under runc exactly as their pod specs say: the bake image
//! bakes an AMI against moto as a restricted, non-root container, a chroot template's pod gets
//! privilege and the host's `/dev`, and the operator image answers `/readyz` as the chart's
//! Deployment runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use baker::api::{BakeTemplate, Builder};
use baker::config::OperatorConfig;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use serde::Deserialize;

use crate::support::runc::{Bundle, image_archive};
use crate::support::ship::wait_for_status;
use crate::support::{random_suffix, repo, rig};

const NONROOT: u32 = 65532;

/// The Dockerfile's last value of an instruction (`USER`, `ENTRYPOINT`, `CMD`) or `ARG` default.
fn dockerfile(name: &str, instruction: &str) -> Result<Option<String>> {
    let text = std::fs::read_to_string(repo().join(format!("images/{name}.Dockerfile")))?;
    let prefix = format!("{instruction} ");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .next_back()
        .map(|v| v.trim().to_string()))
}

/// A Dockerfile's exec-form list (`["a", "b"]`) as strings.
fn exec_form(value: &str) -> Result<Vec<String>> {
    Ok(serde_json::from_str(value)?)
}

/// The version dpkg recorded for a package in an unpacked root filesystem.
fn dpkg_version(rootfs: &Path, package: &str) -> Result<Option<String>> {
    let status = std::fs::read_to_string(rootfs.join("var/lib/dpkg/status"))?;
    Ok(status
        .split("\n\n")
        .find(|stanza| stanza.lines().any(|l| l == format!("Package: {package}")))
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Version: ")))
        .map(str::to_string))
}

/// What an image's config says its process is: arguments, (uid, gid), environment.
struct Process {
    args: Vec<String>,
    user: (u64, u64),
    env: Vec<String>,
}

fn process(bundle: &Bundle) -> Result<Process> {
    let config = bundle.config()?;
    let p = &config["process"];
    Ok(Process {
        args: serde_json::from_value(p["args"].clone())?,
        user: (
            p["user"]["uid"].as_u64().unwrap_or(0),
            p["user"]["gid"].as_u64().unwrap_or(0),
        ),
        env: serde_json::from_value(p["env"].clone())?,
    })
}

#[tokio::test]
#[ignore = "needs the images: make test"]
async fn both_routes_agree_on_user_entrypoint_and_binaries_and_say_how_their_packer_differs() -> Result<()> {
    // The operator: distroless-like, the binary where the Dockerfile puts it, no shell.
    let operator = Bundle::unpack(&image_archive("operator")?)?;
    let Process { args, user, env } = process(&operator)?;
    ensure!(
        env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin:")),
        "the operator image sets PATH as distroless does: {env:?}"
    );
    let mut want = exec_form(&dockerfile("operator", "ENTRYPOINT")?.context("ENTRYPOINT")?)?;
    want.extend(exec_form(&dockerfile("operator", "CMD")?.context("CMD")?)?);
    ensure!(
        args == want,
        "operator entrypoint and cmd {args:?}, the Dockerfile's {want:?}"
    );
    ensure!(
        dockerfile("operator", "USER")?.as_deref() == Some("65532:65532") && user == (65532, 65532),
        "operator user {user:?}"
    );
    let root = operator.rootfs();
    for path in [
        "usr/local/bin/baker",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
    ] {
        ensure!(root.join(path).is_file(), "the operator image has no /{path}");
    }
    ensure!(
        !root.join("bin/sh").exists() && !root.join("usr/bin/dpkg").exists(),
        "the operator image has a shell or a package manager, which distroless has not"
    );

    // The bake image: packer at the Dockerfile's path, ssh, CA certificates, the same env.
    let bake = Bundle::unpack(&image_archive("bake")?)?;
    let Process { args, user, env } = process(&bake)?;
    let want = exec_form(&dockerfile("bake", "CMD")?.context("CMD")?)?;
    ensure!(
        dockerfile("bake", "ENTRYPOINT")?.as_deref() == Some("[]") && args == want,
        "bake args {args:?}, the Dockerfile's {want:?}"
    );
    ensure!(
        dockerfile("bake", "USER")?.as_deref() == Some("65532:65532") && user == (65532, 65532),
        "bake user {user:?}"
    );
    for var in [
        "PACKER_PLUGIN_PATH=/opt/packer/plugins",
        "CHECKPOINT_DISABLE=1",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ] {
        ensure!(
            env.iter().any(|e| e == var),
            "the bake image's env lacks {var}: {env:?}"
        );
    }
    let root = bake.rootfs();
    for path in [
        "usr/local/bin/packer",
        "usr/bin/ssh",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        ensure!(root.join(path).exists(), "the bake image has no /{path}");
    }
    ensure!(root.join("opt/packer/plugins").is_dir());

    // What differs, and why: packer's version. The Dockerfile takes HashiCorp's packer and its
    // amazon plugin (from a registry and GitHub); here packer is Debian's package, whose amazon
    // builders are built in (the same packer the rig's node runs).
    let dockerfile_packer = dockerfile("bake", "ARG")?;
    let text = std::fs::read_to_string(repo().join("images/bake.Dockerfile"))?;
    let pinned = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG PACKER_VERSION="))
        .context("the Dockerfile pins PACKER_VERSION")?;
    let debian = dpkg_version(&root, "packer")?.context("Debian's packer in the bake image")?;
    eprintln!(
        "packer: images/bake.Dockerfile ships {pinned} with the amazon plugin; make images ships Debian's {debian} (amazon builders built in). ({dockerfile_packer:?})"
    );
    ensure!(
        debian.starts_with("1.6.") && pinned != debian,
        "the known difference changed: Dockerfile {pinned}, Debian {debian}; update this test and docs/images.md"
    );
    Ok(())
}

/// The rig's ebs template as the operator would read it.
fn rig_ebs_template() -> Result<BakeTemplate> {
    let text = std::fs::read_to_string(repo().join("examples/rig/ebs-example.yaml"))?;
    Ok(serde_yaml::from_str(&text)?)
}

/// The bake pod Baker makes for a Bake of `service` with `template`.
fn bake_pod(template: &BakeTemplate, service: &str) -> k8s_openapi::api::core::v1::PodSpec {
    let config = OperatorConfig {
        aws_credentials_secret: Some("aws-credentials".into()),
        ..OperatorConfig::default()
    };
    let pod = baker::bake::pod::bake_pod(&baker::bake::pod::PodInput {
        bake_name: service,
        namespace: "team",
        owner: OwnerReference::default(),
        service,
        template: &template.spec,
        config: &config,
    });
    pod.spec.unwrap_or_default()
}

/// A directory (or file) the non-root container may write, as an emptyDir with fsGroup is.
fn owned_by_nonroot(path: &Path) -> Result<()> {
    std::os::unix::fs::chown(path, Some(NONROOT), Some(NONROOT))?;
    Ok(())
}

/// The template, work and termination-log volumes of a bake pod, in `dir`.
fn bake_volumes(dir: &Path, rendered: Option<&str>) -> Result<BTreeMap<String, PathBuf>> {
    let template = dir.join("template");
    let work = dir.join("work");
    std::fs::create_dir_all(&template)?;
    std::fs::create_dir_all(&work)?;
    owned_by_nonroot(&work)?;
    if let Some(rendered) = rendered {
        std::fs::write(template.join(baker::bake::pod::TEMPLATE_KEY), rendered)?;
    }
    let log = dir.join("termination-log");
    std::fs::write(&log, "")?;
    owned_by_nonroot(&log)?;
    Ok(BTreeMap::from([
        ("template".to_string(), template),
        ("work".to_string(), work),
        ("termination-log".to_string(), log),
    ]))
}

/// The credentials the pod takes from its Secret: the rig's.
fn credentials() -> BTreeMap<String, String> {
    let rig = rig();
    BTreeMap::from([
        (
            "AWS_ACCESS_KEY_ID".to_string(),
            rig.var("AWS_ACCESS_KEY_ID").to_string(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".to_string(),
            rig.var("AWS_SECRET_ACCESS_KEY").to_string(),
        ),
    ])
}

/// The Packer template Baker renders for a Bake of `service` 1.0.0 (hvm) on the rig's ebs
/// template, through the command line.
fn render(service: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let bake = dir.path().join("bake.yaml");
    std::fs::write(
        &bake,
        format!(
            "apiVersion: baker.io/v1alpha1\nkind: Bake\nmetadata:\n  name: {service}\nspec:\n  template: ebs-example\n  service: {service}\n  version: \"1.0.0\"\n  virtualizationType: hvm\n"
        ),
    )?;
    let out = rig()
        .command(env!("CARGO_BIN_EXE_baker"))
        .args(["template", "render", "--template"])
        .arg(repo().join("examples/rig/ebs-example.yaml"))
        .arg("--bake")
        .arg(&bake)
        .output()?;
    ensure!(
        out.status.success(),
        "render: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn the_bake_image_bakes_an_ami_under_runc_as_the_restricted_bake_pod_says() -> Result<()> {
    let rig = rig();
    let service = format!("runc-{}", random_suffix());
    let template = rig_ebs_template()?;
    let pod = bake_pod(&template, &service);
    let sc = pod.containers[0].security_context.clone().unwrap_or_default();
    ensure!(sc.read_only_root_filesystem == Some(true) && sc.run_as_user == Some(65532));

    // First what the container may do: its user, no capabilities, a root it cannot write.
    let bundle = Bundle::unpack(&image_archive("bake")?)?;
    let dir = tempfile::tempdir()?;
    let volumes = bake_volumes(dir.path(), Some(&render(&service)?))?;
    let mut probe = pod.clone();
    probe.containers[0].command = Some(vec![
        "sh".into(),
        "-c".into(),
        "id -u; grep CapEff /proc/self/status; touch /usr/x 2>&1 || echo root-read-only; touch /bake/template/x 2>&1 || echo template-read-only; touch /bake/work/x && echo work-writable".into(),
    ]);
    bundle.as_pod(&probe, "packer", &volumes, &credentials())?;
    let (code, out) = bundle
        .run(&format!("{service}-probe"), Duration::from_secs(60))
        .await?;
    ensure!(code == 0, "the probe failed ({code}): {out}");
    for want in [
        "65532",
        "CapEff:\t0000000000000000",
        "root-read-only",
        "template-read-only",
        "work-writable",
    ] {
        ensure!(out.contains(want), "the container's view lacks {want:?}: {out}");
    }

    // Then the bake itself: packer against moto, as the pod runs it.
    bundle.as_pod(&pod, "packer", &volumes, &credentials())?;
    let (code, out) = bundle.run(&service, Duration::from_secs(300)).await?;
    ensure!(code == 0, "packer failed ({code}): {out}");
    let manifest = std::fs::read_to_string(&volumes["termination-log"])?;
    ensure!(
        manifest.contains("ami-"),
        "packer's manifest in the termination log: {manifest}"
    );
    let images = rig
        .ec2()
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("name")
                .values(format!("{service}-1.0.0-hvm-*"))
                .build(),
        )
        .send()
        .await?;
    ensure!(
        images.images().len() == 1,
        "one AMI in moto: {:?}",
        images.images()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs the images: make test"]
async fn a_chroot_templates_bake_pod_runs_privileged_as_root_with_the_hosts_dev() -> Result<()> {
    let mut template = rig_ebs_template()?;
    template.spec.builder = Builder::AmazonChroot;
    let mut pod = bake_pod(&template, "chroot");
    // A device node the host has and runc's own /dev does not.
    let device = ["loop-control", "kmsg", "mem", "fuse", "net/tun"]
        .into_iter()
        .find(|d| Path::new("/dev").join(d).exists())
        .context("the host has none of /dev/loop-control, kmsg, mem, fuse, net/tun")?;
    pod.containers[0].command = Some(vec![
        "sh".into(),
        "-c".into(),
        format!("id -u; grep CapEff /proc/self/status; test -e /dev/{device} && echo host-dev"),
    ]);
    let bundle = Bundle::unpack(&image_archive("bake")?)?;
    let dir = tempfile::tempdir()?;
    let volumes = bake_volumes(dir.path(), None)?;
    bundle.as_pod(&pod, "packer", &volumes, &credentials())?;
    let (code, out) = bundle
        .run(&format!("chroot-{}", random_suffix()), Duration::from_secs(60))
        .await?;
    ensure!(code == 0, "the chroot probe failed ({code}): {out}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.first() == Some(&"0"), "root: {out}");
    ensure!(
        !out.contains("CapEff:\t0000000000000000") && out.contains("host-dev"),
        "privileged with the host's /dev: {out}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn the_operator_image_answers_readyz_under_runc_as_the_charts_deployment_runs_it() -> Result<()> {
    let (rig, _client, ns) = crate::support::bake::namespace("runc-operator").await?;
    let chart = crate::support::chart_dir();
    let rendered = rig
        .helm([
            "template",
            "baker",
            &chart.to_string_lossy(),
            "--set",
            "createBakeNamespaces=false",
        ])
        .await?
        .ok()?;
    let text = rendered.stdout;
    let deployment: Deployment = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .filter(|v| v["kind"] == "Deployment")
        .find_map(|v| serde_yaml::from_value(v).ok())
        .context("the chart renders a Deployment")?;
    let pod = deployment
        .spec
        .template
        .spec
        .context("the Deployment's pod spec")?;

    // In place of the ServiceAccount token a kubelet mounts: the rig's kubeconfig.
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(rig.kubeconfig_path(), &kubeconfig)?;
    owned_by_nonroot(&kubeconfig)?;
    let port = crate::support::bake::free_port().await?;
    let env = BTreeMap::from([
        ("POD_NAME".to_string(), "baker-runc".to_string()),
        ("POD_NAMESPACE".to_string(), ns.name().to_string()),
        ("BAKER_WATCH_NAMESPACE".to_string(), ns.name().to_string()),
        ("AWS_REGION".to_string(), rig.region().to_string()),
        ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
        ("BAKER_HTTP_ADDR".to_string(), format!("127.0.0.1:{port}")),
        ("KUBECONFIG".to_string(), "/var/run/baker/kubeconfig".to_string()),
        ("BAKER_LEADER_ELECTION".to_string(), "false".to_string()),
    ]);
    let mut pod = pod;
    let mut container = pod.containers[0].clone();
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(k8s_openapi::api::core::v1::VolumeMount {
            name: "kubeconfig".into(),
            mount_path: "/var/run/baker".into(),
            read_only: Some(true),
            ..Default::default()
        });
    container.termination_message_path = None;
    pod.containers[0] = container;
    pod.volumes
        .get_or_insert_with(Vec::new)
        .push(k8s_openapi::api::core::v1::Volume {
            name: "kubeconfig".into(),
            ..Default::default()
        });
    let bundle = Bundle::unpack(&image_archive("operator")?)?;
    let volumes = BTreeMap::from([("kubeconfig".to_string(), dir.path().to_path_buf())]);
    let name = pod.containers[0].name.clone();
    bundle.as_pod(&pod, &name, &volumes, &env)?;
    let running = bundle.start(&format!("operator-{}", random_suffix()))?;
    let addr = format!("127.0.0.1:{port}");
    let ready = wait_for_status(&addr, "/readyz", 200, Duration::from_secs(60)).await;
    if let Err(e) = ready {
        let out = running.stop().await;
        anyhow::bail!("{e}: {out}");
    }
    running.stop().await;
    Ok(())
}
