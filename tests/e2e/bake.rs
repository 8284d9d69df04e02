//! End to end on the rig: real apiserver, real packer in a bake pod on the local node, moto as EC2.
//! Each test has its own namespace, BakeTemplate and operator process (watching that namespace).

use std::time::Duration;

use anyhow::Result;
use baker::api::{Bake, BakePhase, keys};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::support::bake::*;
use crate::support::wait_for_pod_phase;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bake_succeeds_with_an_ami_tagged_with_its_uid_service_and_version() -> Result<()> {
    let (rig, _, ns, template) = namespace_with_template("bake-ok", "").await?;
    let _operator = Operator::start(rig, ns.name()).await?;

    create_bake(
        &ns,
        &bake_yaml(
            "simple-service-1.0.4",
            &template,
            "simple-service",
            "1.0.4",
            "hvm",
        ),
    )
    .await?;
    let bakes = ns.api::<Bake>();
    let bake = wait_for_phase(&bakes, "simple-service-1.0.4", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let status = bake.status.clone().unwrap_or_default();
    let ami = status.ami_id.clone().expect("a Succeeded Bake has an amiId");
    assert!(
        status.source_ami_id.is_some(),
        "source image recorded: {status:?}"
    );

    // The AMI exists in EC2, tagged with the Bake's UID, service and version.
    let images = images_of(&bake).await?;
    assert_eq!(images.len(), 1, "exactly one AMI tagged with the Bake's UID");
    let image = &images[0];
    assert_eq!(image.image_id(), Some(ami.as_str()));
    assert_eq!(tag(image, keys::SERVICE), Some("simple-service"));
    assert_eq!(tag(image, keys::VERSION), Some("1.0.4"));
    assert_eq!(tag(image, keys::SOURCE_AMI), status.source_ami_id.as_deref());

    // kubectl shows it, waits on it, and shows packer's output.
    let get = rig.kubectl(["-n", ns.name(), "get", "bakes"]).await?.ok()?;
    assert!(
        get.stdout.contains(&ami) && get.stdout.contains("Succeeded"),
        "{}",
        get.stdout
    );
    for column in ["SERVICE", "VERSION", "VIRT", "PHASE", "AMI", "AGE"] {
        assert!(
            get.stdout.contains(column),
            "column {column} missing: {}",
            get.stdout
        );
    }
    rig.kubectl([
        "-n",
        ns.name(),
        "wait",
        "--for=condition=Ready",
        "bake/simple-service-1.0.4",
        "--timeout=30s",
    ])
    .await?
    .ok()?;
    let pod = status.pod_name.clone().expect("pod recorded");
    let logs = rig
        .kubectl(["-n", ns.name(), "logs", &format!("pod/{pod}")])
        .await?
        .ok()?;
    assert!(
        logs.stdout.contains(&ami),
        "packer's output names the AMI: {}",
        logs.stdout
    );
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bake_from_a_missing_source_image_fails_with_packers_error_and_no_ami() -> Result<()> {
    let (rig, _, ns, template) =
        namespace_with_template("bake-fail", "  source:\n    amiId: ami-00000000000dead00").await?;
    let _operator = Operator::start(rig, ns.name()).await?;

    create_bake(
        &ns,
        &bake_yaml("broken-1.0.0", &template, "broken", "1.0.0", "hvm"),
    )
    .await?;
    let bake = wait_for_phase(&ns.api::<Bake>(), "broken-1.0.0", BakePhase::Failed, BAKE_TIMEOUT).await?;
    let status = bake.status.clone().unwrap_or_default();
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("InvalidAMIID.NotFound"),
        "packer's error in message: {message}"
    );
    assert_eq!(status.ami_id, None);
    let images = images_of(&bake).await?;
    assert!(images.is_empty(), "no AMI for a failed bake");
    let stalled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .map(|c| c.status.clone());
    assert_eq!(stalled.as_deref(), Some("True"));
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn operator_killed_while_packer_runs_ends_with_one_pod_and_one_ami() -> Result<()> {
    let (rig, client, ns) = namespace("bake-restart").await?;
    // Every EC2 request of packer takes 400 ms more: the bake runs for several seconds.
    let (proxy, template) = slow_template(&client, &ns, Delay::All(Duration::from_millis(400)), "").await?;

    // Count every bake pod the namespace ever sees.
    let watch = PodWatch::start(ns.api());

    let mut operator = Operator::start(rig, ns.name()).await?;
    create_bake(&ns, &bake_yaml("slow-1.0.0", &template, "slow", "1.0.0", "hvm")).await?;
    let bakes = ns.api::<Bake>();
    wait_for_phase(&bakes, "slow-1.0.0", BakePhase::Running, BAKE_TIMEOUT).await?;
    operator.kill().await?;

    // Packer finishes while no operator runs; a new one picks up from the status it left.
    let pod_name = "bake-slow-1.0.0";
    wait_for_pod_phase(&ns.api::<Pod>(), pod_name, &["Succeeded"], BAKE_TIMEOUT).await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let bake = wait_for_phase(&bakes, "slow-1.0.0", BakePhase::Succeeded, BAKE_TIMEOUT).await?;

    let images = images_of(&bake).await?;
    assert_eq!(images.len(), 1, "one AMI");
    let pod = ns.api::<Pod>().get(pod_name).await?;
    assert_eq!(bake.status.as_ref().and_then(|s| s.pod_uid.clone()), pod.uid());
    assert_eq!(watch.pods_seen(), 1, "one bake pod ever existed");
    drop(proxy);
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bad_manifests_are_refused_at_admission_naming_the_field() -> Result<()> {
    let (rig, _, ns) = namespace("bake-admission").await?;
    let dir = tempfile::tempdir()?;
    let cases = [
        ("virt", bake_yaml("virt", "t", "svc", "1.0", "xen"), "spec.virtualizationType"),
        ("service", bake_yaml("service", "t", "Simple_Service", "1.0", "hvm"), "spec.service"),
        ("semicolon", bake_yaml("semicolon", "t", "svc", "1.0;rm", "hvm"), "spec.version"),
        ("space", bake_yaml("space", "t", "svc", "1.0 beta", "hvm"), "spec.version"),
        (
            "no-template",
            "apiVersion: baker.io/v1alpha1\nkind: Bake\nmetadata:\n  name: no-template\nspec:\n  service: svc\n  version: \"1.0\"\n  virtualizationType: hvm\n".to_string(),
            "spec.template",
        ),
    ];
    for (name, yaml, field) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        let out = rig
            .kubectl(["-n", ns.name(), "apply", "-f", &file.to_string_lossy()])
            .await?;
        assert!(!out.success(), "{name} was accepted");
        assert!(
            out.stderr.contains(field),
            "{name}: error does not name {field}: {}",
            out.stderr
        );
    }

    // The spec cannot change after creation.
    let file = dir.path().join("ok.yaml");
    std::fs::write(&file, bake_yaml("frozen", "t", "svc", "1.0", "hvm"))?;
    rig.kubectl(["-n", ns.name(), "apply", "-f", &file.to_string_lossy()])
        .await?
        .ok()?;
    std::fs::write(&file, bake_yaml("frozen", "t", "svc", "2.0", "hvm"))?;
    let out = rig
        .kubectl(["-n", ns.name(), "apply", "-f", &file.to_string_lossy()])
        .await?;
    assert!(!out.success(), "a spec edit was accepted");
    assert!(out.stderr.contains("spec is immutable"), "{}", out.stderr);
    finish(ns).await
}
