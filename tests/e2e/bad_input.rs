//! The bad-input corpus (`tests/bad_input`, format in its README) against the rig: every case
//! gets the outcome its file names. Each test reports every case that missed, not just the first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use baker::api::{AmiCatalog, Bake, BakePhase, BakeTemplate};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use crate::support::bake::*;
use crate::support::ship::*;
use crate::support::{try_wait_until, wait_deleted};

const TOKEN: &str = "bad-input-token-7c1e";

/// What a case expects.
#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "camelCase")]
enum Expect {
    /// The API server refuses the object; its error holds `message`.
    Refused,
    /// The API server accepts the object (a value at a limit).
    Admitted,
    /// A Bake that is admitted and ends Failed, its Ready reason `message`, with no pod.
    Fails,
    /// A Bake that is admitted and waits, its Ready reason `message`, with no pod.
    Waits,
    /// A request to the seed's HTTP API answered with `status`, creating `bakesCreated` Bakes.
    Http,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    method: String,
    path: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// A Content-Length the head declares, with no body sent.
    #[serde(default)]
    declared_length: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    case: String,
    expect: Expect,
    message: Option<String>,
    #[serde(default)]
    before: Vec<serde_json::Value>,
    object: Option<serde_json::Value>,
    request: Option<Request>,
    status: Option<u16>,
    bakes_created: Option<usize>,
    /// Not in the file: where the case came from, for reports.
    #[serde(skip)]
    file: String,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_input")
}

/// Every case of the corpus, `__NS__` and `__TOKEN__` replaced, in file order.
fn corpus(namespace: &str) -> Result<Vec<Case>> {
    let mut files = Vec::new();
    for kind in std::fs::read_dir(corpus_dir()).context("reading tests/bad_input")? {
        let kind = kind?.path();
        if kind.is_dir() {
            for file in std::fs::read_dir(&kind)? {
                let file = file?.path();
                if file.extension().is_some_and(|e| e == "yaml") {
                    files.push(file);
                }
            }
        }
    }
    files.sort();
    let root = corpus_dir();
    files
        .iter()
        .map(|path| {
            let name = path.strip_prefix(&root).unwrap_or(path).display().to_string();
            let text = std::fs::read_to_string(path)?
                .replace("__NS__", namespace)
                .replace("__TOKEN__", TOKEN);
            let mut case: Case = serde_yaml::from_str(&text).with_context(|| format!("parsing {name}"))?;
            case.file = name;
            Ok(case)
        })
        .collect()
}

fn cases(namespace: &str, wanted: &[Expect]) -> Result<Vec<Case>> {
    let all = corpus(namespace)?;
    let some: Vec<Case> = all.into_iter().filter(|c| wanted.contains(&c.expect)).collect();
    if some.is_empty() {
        bail!("the corpus has no case expecting any of {wanted:?}");
    }
    Ok(some)
}

/// Fails naming every case that missed.
fn report(missed: Vec<String>, total: usize) -> Result<()> {
    if missed.is_empty() {
        eprintln!("all {total} cases as expected");
        return Ok(());
    }
    bail!(
        "{} of {total} cases missed:\n  {}",
        missed.len(),
        missed.join("\n  ")
    )
}

/// The API for an object of the corpus, by its kind (namespaced kinds in `namespace`).
fn api_for(
    client: &Client,
    namespace: &str,
    object: &serde_json::Value,
) -> Result<(Api<DynamicObject>, DynamicObject)> {
    let object: DynamicObject = serde_json::from_value(object.clone()).context("not a Kubernetes object")?;
    let kind = object.types.as_ref().map(|t| t.kind.as_str()).unwrap_or_default();
    let api = match kind {
        "Bake" => Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<Bake>(&())),
        "AmiCatalog" => {
            Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<AmiCatalog>(&()))
        }
        "BakeTemplate" => Api::all_with(client.clone(), &ApiResource::erase::<BakeTemplate>(&())),
        "BakeSchedule" => Api::namespaced_with(
            client.clone(),
            namespace,
            &ApiResource::erase::<baker::api::schedule::BakeSchedule>(&()),
        ),
        "AmiChannel" => Api::namespaced_with(
            client.clone(),
            namespace,
            &ApiResource::erase::<baker::api::channel::AmiChannel>(&()),
        ),
        other => bail!("the corpus names kind {other:?}, which is not Baker's"),
    };
    Ok((api, object))
}

/// Server-side apply, as `kubectl apply --server-side` sends it.
async fn apply(
    client: &Client,
    namespace: &str,
    object: &serde_json::Value,
) -> Result<kube::Result<DynamicObject>> {
    let (api, object) = api_for(client, namespace, object)?;
    let params = PatchParams::apply("baker-bad-input").force();
    Ok(api
        .patch(&object.name_any(), &params, &Patch::Apply(&object))
        .await)
}

async fn delete(client: &Client, namespace: &str, object: &serde_json::Value) -> Result<()> {
    let (api, object) = api_for(client, namespace, object)?;
    match api.delete(&object.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the case's `before` objects, which must all be admitted.
async fn apply_before(client: &Client, namespace: &str, case: &Case) -> Result<()> {
    for object in &case.before {
        apply(client, namespace, object)
            .await?
            .with_context(|| format!("{}: a `before` object was refused", case.file))?;
    }
    Ok(())
}

/// One admission case: the miss, if any. Leaves nothing behind.
async fn admission(client: &Client, namespace: &str, case: &Case) -> Result<Option<String>> {
    apply_before(client, namespace, case).await?;
    let object = case
        .object
        .as_ref()
        .with_context(|| format!("{}: no object", case.file))?;
    let outcome = apply(client, namespace, object).await?;
    let miss = match (case.expect, outcome) {
        (Expect::Admitted, Ok(_)) => None,
        (Expect::Admitted, Err(e)) => Some(format!("refused: {e}")),
        (_, Ok(_)) => Some("admitted".to_string()),
        (_, Err(kube::Error::Api(s))) => {
            let want = case.message.as_deref().unwrap_or_default();
            (!s.message.contains(want)).then(|| format!("refused, but without {want:?}: {}", s.message))
        }
        (_, Err(e)) => Some(format!("no answer from the API server: {e}")),
    };
    delete(client, namespace, object).await?;
    for before in &case.before {
        delete(client, namespace, before).await?;
    }
    Ok(miss.map(|m| format!("{} ({}): {m}", case.file, case.case)))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn admission_refuses_every_bad_object_of_the_corpus_naming_the_rule_and_admits_every_boundary_case()
-> Result<()> {
    let (_, client, ns) = namespace("bi-admit").await?;
    let cases = cases(ns.name(), &[Expect::Refused, Expect::Admitted])?;
    let mut missed = Vec::new();
    for case in &cases {
        if let Some(miss) = admission(&client, ns.name(), case).await? {
            missed.push(miss);
        }
    }
    finish(ns).await?;
    report(missed, cases.len())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn admitted_bakes_that_cannot_bake_fail_or_wait_with_the_reason_in_status_and_no_pod() -> Result<()> {
    let (rig, client, ns) = namespace("bi-status").await?;
    let operator = Operator::start(rig, ns.name()).await?;
    let cases = cases(ns.name(), &[Expect::Fails, Expect::Waits])?;
    let bakes = ns.api::<Bake>();
    let mut missed = Vec::new();
    for case in &cases {
        apply_before(&client, ns.name(), case).await?;
        let object = case
            .object
            .as_ref()
            .with_context(|| format!("{}: no object", case.file))?;
        apply(&client, ns.name(), object)
            .await?
            .with_context(|| format!("{}: the Bake was refused", case.file))?;
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let want = case.message.clone().unwrap_or_default();
        let seen = try_wait_until(
            Duration::from_secs(60),
            &format!("{}: Ready reason {want}", case.file),
            || {
                let (bakes, name, want) = (bakes.clone(), name.clone(), want.clone());
                async move {
                    let bake = bakes.get(&name).await?;
                    Ok((ready_reason(&bake).as_deref() == Some(&want)).then_some(bake))
                }
            },
        )
        .await;
        let miss = match seen {
            Err(e) => Some(format!("{e:#}")),
            Ok(bake) => {
                let phase = bake.status.as_ref().and_then(|s| s.phase);
                let pods = ns.api::<Pod>().list(&Default::default()).await?.items.len();
                match (case.expect, phase) {
                    _ if pods > 0 => Some(format!("{pods} pod(s) exist")),
                    (Expect::Fails, Some(BakePhase::Failed)) => None,
                    (Expect::Waits, Some(p)) if p != BakePhase::Failed => None,
                    (_, p) => Some(format!("phase {p:?}")),
                }
            }
        };
        if let Some(miss) = miss {
            missed.push(format!("{} ({}): {miss}", case.file, case.case));
        }
        delete(&client, ns.name(), object).await?;
        wait_deleted(&bakes, &name, Duration::from_secs(60)).await?;
        for before in &case.before {
            delete(&client, ns.name(), before).await?;
        }
    }
    finish(ns).await?;
    drop(operator);
    report(missed, cases.len())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn the_seed_api_answers_every_bad_request_of_the_corpus_with_its_status_and_creates_no_bake()
-> Result<()> {
    let (rig, _, ns, _template) = namespace_with_template("bi-http", "").await?;
    let (operator, _token) = Operator::start_seed_api(rig, ns.name(), TOKEN, &[]).await?;
    let cases = cases(ns.name(), &[Expect::Http])?;
    let bakes = ns.api::<Bake>();
    let mut missed = Vec::new();
    for case in &cases {
        let r = case
            .request
            .as_ref()
            .with_context(|| format!("{}: no request", case.file))?;
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let before = bakes.list(&Default::default()).await?.items.len();
        let sent = request_declaring(&operator.http, &r.method, &r.path, &headers, r.declared_length);
        let miss = match tokio::time::timeout(Duration::from_secs(30), sent).await {
            Err(_) => Some("no answer within 30 s".to_string()),
            Ok(Err(e)) => Some(format!("request failed: {e:#}")),
            Ok(Ok(reply)) => {
                let after = bakes.list(&Default::default()).await?.items.len();
                let created = after.saturating_sub(before);
                let want = case.bakes_created.unwrap_or(0);
                if Some(reply.status) != case.status {
                    Some(format!("status {} (body {:?})", reply.status, reply.body))
                } else if created != want {
                    Some(format!("{created} Bake(s) created, not {want}"))
                } else {
                    None
                }
            }
        };
        if let Some(miss) = miss {
            missed.push(format!("{} ({}): {miss}", case.file, case.case));
        }
    }
    finish(ns).await?;
    drop(operator);
    report(missed, cases.len())
}

// Pure: the corpus is well formed, so a case cannot pass by saying nothing.
#[test]
fn every_case_of_the_corpus_parses_and_says_what_it_expects() {
    let cases = corpus("ns").unwrap_or_else(|e| panic!("{e:#}"));
    assert!(cases.len() >= 70, "only {} cases", cases.len());
    for c in &cases {
        match c.expect {
            Expect::Http => assert!(
                c.request.is_some() && c.status.is_some() && c.object.is_none(),
                "{}: an http case names a request and a status",
                c.file
            ),
            Expect::Admitted => assert!(c.object.is_some(), "{}: no object", c.file),
            _ => assert!(
                c.object.is_some() && c.message.as_deref().is_some_and(|m| !m.is_empty()),
                "{}: a refused, failing or waiting case names its object and message",
                c.file
            ),
        }
    }
}
