//! End to end on the rig: what one tenant (a namespace that may create Bakes, ConfigMaps, pods
//! and AmiCatalogs) can make the operator do. One test per attack; each checks that nothing
//! outside the attacker's namespace changed and that the Bake concerned ends with a clear reason.
//!
//! Several tests run an operator for every namespace, as a cluster-wide install does; such an
//! operator acts on every test's Bakes, so the tests of this file run one at a time.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use baker::api::{AmiCatalog, Bake, BakePhase, keys};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

use crate::support::bake::*;
use crate::support::{TestNamespace, random_suffix, try_wait_until, wait_deleted, wait_for_object};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Template lines that make bake pods ask for a node label no node has: they stay unscheduled.
const NOWHERE: &str = "  pod:\n    nodeSelector: {baker.io/test-no-such-node: \"true\"}";

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_relabelled_bake_and_an_identical_bake_of_another_namespace_never_hand_a_tenant_a_foreign_image()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, _, victim, template) = namespace_with_template("victim", "").await?;
    let (_, _, attacker) = namespace("attacker").await?;
    let _operator = Operator::start_cluster_wide(rig, &[], &[]).await?;
    let service = format!("svc-{}", random_suffix());

    // The victim bakes its image, then deletes the Bake: the image stays in EC2, and only its own
    // key tag can lead a later Bake to it.
    create_bake(&victim, &bake_yaml("first", &template, &service, "1.0.0", "hvm")).await?;
    let first = wait_for_phase(&victim.api(), "first", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let victim_ami = ami_of(&first)?;
    let victim_key = first
        .status
        .as_ref()
        .and_then(|s| s.bake_key.clone())
        .context("bakeKey")?;
    victim
        .api::<Bake>()
        .delete("first", &DeleteParams::default())
        .await?;
    wait_deleted(&victim.api::<Bake>(), "first", Duration::from_secs(60)).await?;

    // The attacker bakes something else and labels its Bake with the victim's key.
    create_bake(&attacker, &bake_yaml("bait", &template, &service, "6.6.6", "hvm")).await?;
    let bait = wait_for_phase(&attacker.api(), "bait", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let bait_ami = ami_of(&bait)?;
    let label = serde_json::json!({ "metadata": { "labels": { keys::BAKE_KEY: victim_key } } });
    attacker
        .api::<Bake>()
        .patch("bait", &PatchParams::default(), &Patch::Merge(&label))
        .await?;

    // The victim's next identical Bake reuses its own image, found by the image's own key tag,
    // never the Bake that carries its key as a label.
    create_bake(&victim, &bake_yaml("second", &template, &service, "1.0.0", "hvm")).await?;
    let second = wait_for_phase(&victim.api(), "second", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    expect_reason(&second, "Reused")?;
    ensure!(
        ami_of(&second)? == victim_ami,
        "reused {} not the victim's {victim_ami}",
        ami_of(&second)?
    );
    ensure!(ami_of(&second)? != bait_ami);

    // An identical Bake in the attacker's namespace does not get the victim's image: by default
    // reuse stays within a namespace, so it bakes its own.
    create_bake(&attacker, &bake_yaml("copy", &template, &service, "1.0.0", "hvm")).await?;
    let copy = wait_for_phase(&attacker.api(), "copy", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    expect_reason(&copy, "Succeeded")?;
    ensure!(
        ami_of(&copy)? != victim_ami,
        "the attacker's Bake reused the victim's image"
    );

    finish(attacker).await?;
    finish(victim).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn with_cluster_reuse_deleting_a_bake_keeps_its_image_while_another_namespaces_bake_reuses_it()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, _, owner, template) = namespace_with_template("owner", "").await?;
    let (_, _, user) = namespace("user").await?;
    let _operator = Operator::start_cluster_wide(rig, &["--reuse-scope", "cluster"], &[]).await?;
    let service = format!("svc-{}", random_suffix());
    let ec2 = rig.ec2();

    let mut yaml = bake_yaml("base", &template, &service, "1.0.0", "hvm");
    yaml.push_str("  deregisterImageOnDelete: true\n");
    create_bake(&owner, &yaml).await?;
    let base = wait_for_phase(&owner.api(), "base", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let ami = ami_of(&base)?;

    // The admin allowed reuse across namespaces: the other namespace's identical Bake reuses it.
    create_bake(&user, &bake_yaml("same", &template, &service, "1.0.0", "hvm")).await?;
    let same = wait_for_phase(&user.api(), "same", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    expect_reason(&same, "Reused")?;
    ensure!(ami_of(&same)? == ami);

    // Deleting the first Bake would deregister its image, but another Bake names it.
    owner
        .api::<Bake>()
        .delete("base", &DeleteParams::default())
        .await?;
    wait_deleted(&owner.api::<Bake>(), "base", Duration::from_secs(60)).await?;
    ensure!(
        image_exists(&ec2, &ami).await?,
        "{ami} was deregistered while Bake {}/same uses it",
        user.name()
    );
    let kept = event_notes(&owner, "ImageKept").await?;
    ensure!(
        kept.iter().any(|n| n.contains(&ami) && n.contains("same")),
        "no ImageKept Event naming the user: {kept:?}"
    );

    finish(user).await?;
    finish(owner).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_catalogs_retention_removes_only_its_own_namespaces_baked_images_a_few_per_sync() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, _, ns) = namespace("retain").await?;
    let _operator = Operator::start_with(rig, ns.name(), &["--retention-max-removals", "1"], &[]).await?;
    let ec2 = rig.ec2();
    let sfx = random_suffix();
    let service = format!("svc-{sfx}");
    let baked = |namespace: &str| {
        vec![
            (keys::SERVICE, service.clone()),
            (keys::BAKE_UID, format!("uid-{sfx}")),
            (keys::NAMESPACE, namespace.to_string()),
        ]
    };
    let as_refs = |tags: &[(&'static str, String)]| -> Vec<(&'static str, String)> { tags.to_vec() };
    let register = |prefix: String, tags: Vec<(&'static str, String)>| {
        let ec2 = ec2.clone();
        async move {
            let refs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
            register_images(&ec2, &prefix, 3, &refs).await
        }
    };
    // Another tenant's images and images Baker never made, all of the same service.
    let others = register(format!("ret-{sfx}-other"), as_refs(&baked("someone-else"))).await?;
    let foreign = register(
        format!("ret-{sfx}-foreign"),
        vec![(keys::SERVICE, service.clone())],
    )
    .await?;
    // This namespace's own: the newest stays, the two others go, one per sync.
    let own = register(format!("ret-{sfx}-own"), as_refs(&baked(ns.name()))).await?;

    let catalogs = ns.api::<AmiCatalog>();
    let spec = format!("service: {service}\nrefreshIntervalSeconds: 10\nretention: {{keepNewest: 1}}");
    apply_catalog(&catalogs, "all", &spec).await?;
    let first = wait_catalog(&catalogs, "all", "a first removal", |s| {
        s.retention.as_ref().is_some_and(|r| !r.removed.is_empty())
    })
    .await?;
    let retention = first.status.and_then(|s| s.retention).unwrap_or_default();
    ensure!(retention.removed.len() == 1, "{retention:?}");
    ensure!(retention.deferred == Some(1), "{retention:?}");
    try_wait_until(
        Duration::from_secs(60),
        "the second removal, at the next sync",
        || async {
            let mut gone = 0;
            for id in &own {
                if !image_exists(&ec2, id).await? {
                    gone += 1;
                }
            }
            Ok((gone == 2).then_some(()))
        },
    )
    .await?;
    let mut newest_own = Vec::new();
    for id in &own {
        if image_exists(&ec2, id).await? {
            newest_own.push(id.clone());
        }
    }
    ensure!(
        newest_own.len() == 1,
        "the newest own image stays: {newest_own:?}"
    );
    for id in others.iter().chain(&foreign) {
        ensure!(
            image_exists(&ec2, id).await?,
            "{id}, not this namespace's, was removed"
        );
    }
    let removed = event_notes(&ns, "ImageRemoved").await?;
    ensure!(removed.len() == 2, "{removed:?}");
    finish(ns).await
}

/// A pod named `name` that never runs (no node has its label) and is owned by nobody.
fn unschedulable_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "nodeSelector": { "baker.io/test-no-such-node": "true" },
            "containers": [{ "name": "c", "image": "example.invalid/none", "command": ["true"] }],
        },
    }))?)
}

/// A Bake `victim` whose child's name, `bake-victim`, someone took first with `squatter`: what
/// it came to, with its namespace, the squatter as created, the Bake once it failed with reason
/// NameConflict and its message. The operator that failed it goes last, after [`finish`].
struct Squatted<K> {
    ns: TestNamespace,
    squatter: K,
    failed: Bake,
    message: String,
    _operator: Operator,
}

async fn squatted<K>(prefix: &str, squatter: K) -> Result<Squatted<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let (rig, _, ns, template) = namespace_with_template(prefix, "").await?;
    let squatter = ns.api::<K>().create(&PostParams::default(), &squatter).await?;
    let operator = Operator::start(rig, ns.name()).await?;
    create_bake(&ns, &bake_yaml("victim", &template, "svc", "1.0.0", "hvm")).await?;
    let failed = wait_for_phase(&ns.api(), "victim", BakePhase::Failed, BAKE_TIMEOUT).await?;
    let message = expect_reason(&failed, "NameConflict")?;
    Ok(Squatted {
        ns,
        squatter,
        failed,
        message,
        _operator: operator,
    })
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_configmap_made_beforehand_under_the_bakes_name_fails_it_with_name_conflict_and_nothing_runs()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    // Someone who may write ConfigMaps in the namespace takes the name first, with their template.
    let squatter: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "bake-victim" },
        "data": { "template.json": "{\"builders\": [{\"type\": \"null\", \"communicator\": \"none\"}]}" },
    }))?;
    let squat = squatted("squat", squatter).await?;
    ensure!(
        squat.message.contains("ConfigMap bake-victim"),
        "{}",
        squat.message
    );
    ensure!(
        squat.ns.api::<Pod>().get_opt("bake-victim").await?.is_none(),
        "a bake pod was created over a template Baker did not write"
    );
    finish(squat.ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_pod_made_beforehand_under_the_bakes_name_fails_it_with_name_conflict_and_is_left_alone()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let squat = squatted("podsquat", unschedulable_pod("bake-victim")?).await?;
    ensure!(squat.message.contains("Pod bake-victim"), "{}", squat.message);
    let pod = squat.ns.api::<Pod>().get("bake-victim").await?;
    ensure!(
        pod.uid() == squat.squatter.uid(),
        "the squatting pod was replaced"
    );
    ensure!(
        pod.metadata.deletion_timestamp.is_none(),
        "Baker deleted a pod it does not own"
    );
    ensure!(
        squat
            .failed
            .status
            .as_ref()
            .and_then(|s| s.pod_uid.clone())
            .is_none(),
        "the Bake recorded a pod that is not its own"
    );
    finish(squat.ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_pod_a_resource_quota_refuses_fails_the_bake_with_pod_rejected_and_frees_its_slot()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, _, ns, template) = namespace_with_template("quota", "").await?;
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "no-pods" },
        "spec": { "hard": { "pods": "0" } },
    }))?;
    let quotas = ns.api::<ResourceQuota>();
    quotas.create(&PostParams::default(), &quota).await?;
    // The quota controller fills in `used` before the quota admission refuses anything.
    try_wait_until(Duration::from_secs(60), "the quota to be in force", || async {
        Ok(quotas
            .get("no-pods")
            .await?
            .status
            .and_then(|s| s.used)
            .map(|_| ()))
    })
    .await?;
    let _operator = Operator::start_with(
        rig,
        ns.name(),
        &["--max-concurrent-bakes", "1", "--pod-create-attempts", "2"],
        &[],
    )
    .await?;
    create_bake(&ns, &bake_yaml("refused", &template, "svc", "1.0.0", "hvm")).await?;
    let failed = wait_for_phase(&ns.api(), "refused", BakePhase::Failed, BAKE_TIMEOUT).await?;
    let message = expect_reason(&failed, "PodRejected")?;
    ensure!(
        message.contains("quota"),
        "the API server's reason is missing: {message}"
    );
    let warnings = event_notes(&ns, "PodRejected").await?;
    ensure!(!warnings.is_empty(), "no Warning Event for the refused attempt");

    // Its slot is free at once: with the quota gone, the next Bake runs under the cap of one.
    quotas.delete("no-pods", &DeleteParams::default()).await?;
    wait_deleted(&quotas, "no-pods", Duration::from_secs(30)).await?;
    create_bake(&ns, &bake_yaml("next", &template, "svc", "2.0.0", "hvm")).await?;
    wait_for_phase(&ns.api(), "next", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_pod_no_node_will_take_says_so_then_fails_unschedulable_after_the_pod_start_timeout()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (_, _, ns, template) = namespace_with_template("nowhere", NOWHERE).await?;
    // The scheduler's reason reaches the Bake.
    let scheduler_says = |m: &str| m.contains("node") && m.contains("cannot start");
    let (pending, failed, _operator) = pod_never_starts(&ns, &template, "lost", 10, scheduler_says).await?;
    ensure!(pending.contains("fails if this lasts 10s"), "{pending}");
    expect_reason(&failed, "Unschedulable")?;
    finish(ns).await
}

/// Refuses every pod delete in `namespace` through a ValidatingAdmissionPolicy, as a cluster's
/// policy might; returns the policy's name (the binding has the same).
async fn refuse_pod_deletes(client: &kube::Client, namespace: &str) -> Result<String> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let name = format!("refuse-pod-deletes-{namespace}");
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"], "resources": ["pods"],
            }]},
            "validations": [{ "expression": "false", "message": "pods here may not be deleted" }],
        },
    }))?;
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": { "namespaceSelector": { "matchLabels": {
                "kubernetes.io/metadata.name": namespace,
            }}},
        },
    }))?;
    kube::Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    kube::Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(name)
}

async fn allow_pod_deletes(client: &kube::Client, name: &str) -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    kube::Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    kube::Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_deleted_bake_whose_pod_cannot_be_deleted_is_released_after_a_bound_with_a_warning() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // The pod never runs (no node takes it), so only the refused delete keeps it.
    let (rig, client, ns, template) = namespace_with_template("stuck", NOWHERE).await?;
    let _operator = Operator::start_with(rig, ns.name(), &["--bake-grace-seconds", "0"], &[]).await?;
    create_bake(&ns, &bake_yaml("held", &template, "svc", "1.0.0", "hvm")).await?;
    let pods = ns.api::<Pod>();
    wait_for_object(
        &pods,
        "bake-held",
        Duration::from_secs(60),
        "the bake pod",
        |_| true,
    )
    .await?;
    let policy = refuse_pod_deletes(&client, ns.name()).await?;
    // A policy is in force once the API server has loaded it: a probe pod's delete is refused.
    let probe = unschedulable_pod("probe")?;
    let in_force = try_wait_until(
        Duration::from_secs(30),
        "the policy to refuse pod deletes",
        || async {
            if pods.get_opt("probe").await?.is_none() {
                pods.create(&PostParams::default(), &probe).await?;
            }
            Ok(match pods.delete("probe", &DeleteParams::default()).await {
                Err(kube::Error::Api(s)) if s.message.contains("may not be deleted") => Some(()),
                _ => None,
            })
        },
    )
    .await;
    if in_force.is_err() {
        allow_pod_deletes(&client, &policy).await?;
    }
    in_force?;

    let bakes = ns.api::<Bake>();
    bakes.delete("held", &DeleteParams::default()).await?;
    // Released after the grace period (0) and the stop bound (30s), not never.
    let released = wait_deleted(&bakes, "held", Duration::from_secs(90)).await;
    allow_pod_deletes(&client, &policy).await?;
    released?;
    let warnings = event_notes(&ns, "PodStopIncomplete").await?;
    ensure!(
        warnings.iter().any(|n| n.contains("bake-held")),
        "no PodStopIncomplete Event: {warnings:?}"
    );
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_recreated_under_the_same_name_at_once_waits_for_the_old_children_and_bakes() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, _, ns, template) = namespace_with_template("again", "").await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let bakes = ns.api::<Bake>();
    create_bake(&ns, &bake_yaml("same", &template, "svc", "1.0.0", "hvm")).await?;
    let first = wait_for_phase(&bakes, "same", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    bakes.delete("same", &DeleteParams::default()).await?;
    wait_deleted(&bakes, "same", Duration::from_secs(60)).await?;
    // Recreated before garbage collection can have removed the old ConfigMap and pod.
    create_bake(&ns, &bake_yaml("same", &template, "svc", "2.0.0", "hvm")).await?;
    let second = wait_for_phase(&bakes, "same", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    ensure!(second.uid() != first.uid());
    ensure!(
        ami_of(&second)? != ami_of(&first)?,
        "version 2 got version 1's image"
    );
    let config_map = ns.api::<ConfigMap>().get("bake-same").await?;
    ensure!(
        config_map
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == second.uid().as_ref()),
        "the template ConfigMap is not the new Bake's"
    );
    finish(ns).await
}
