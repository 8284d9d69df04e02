//! The seed's HTTP API on the rig, served by a `baker run --seed-api` process.

use std::time::Duration;

use anyhow::Result;
use baker::api::{AmiCatalog, Bake, BakePhase};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::bake::*;
use crate::support::ship::*;
use crate::support::{TestNamespace, random_suffix, try_wait_until};

const TOKEN: &str = "test-token-3f9a";

/// A fresh namespace with a rig BakeTemplate (its name second), and a `baker run --seed-api`
/// process (with `extra` flags) for it, ready; the last value holds the operator's token file.
async fn seed_api(
    prefix: &str,
    extra: &[&str],
) -> Result<(TestNamespace, String, Operator, tempfile::TempDir)> {
    let (rig, _, ns, template) = namespace_with_template(prefix, "").await?;
    let (operator, dir) = Operator::start_seed_api(rig, ns.name(), TOKEN, extra).await?;
    Ok((ns, template, operator, dir))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn post_bake_with_the_token_streams_packer_output_and_ends_with_the_ami_id() -> Result<()> {
    let (ns, template, operator, _token) = seed_api("seed-bake", &[]).await?;
    // A catalog of the service, refreshed hourly: only a succeeded Bake makes it list the image
    // in time.
    let spec = "service: simple-service\nrefreshIntervalSeconds: 3600";
    apply_catalog(&ns.api(), "simple-service", spec).await?;
    let http = operator.http.clone();

    assert_eq!(get(&http, "/ping").await?.body, "pong");
    let health = get(&http, "/healthcheck").await?;
    assert_eq!(health.status, 200);
    assert_eq!(json(&health.body)["healthy"], true);
    let status = get(&http, "/status").await?;
    assert_eq!(json(&status.body)["bakeNamespace"], ns.name());

    let path = format!("/bake/{template}/simple-service/1.0.4/hvm");
    // Without the token: 401, and no Bake.
    let denied = request(&http, "POST", &path, &[]).await?;
    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(json(&denied.body)["field"], "Authorization");
    let wrong = request(&http, "POST", &path, &[("Authorization", "Bearer nope")]).await?;
    assert_eq!(wrong.status, 401);
    // Bad values: 400 naming the field.
    let auth = format!("Bearer {TOKEN}");
    for (bad, field) in [
        (
            format!("/bake/{template}/simple-service/1.0.4/xen"),
            "virtualizationType",
        ),
        (format!("/bake/{template}/Simple_Service/1.0.4/hvm"), "service"),
        (format!("/bake/{template}/simple-service/-1.0/hvm"), "version"),
    ] {
        let r = request(&http, "POST", &bad, &[("Authorization", &auth)]).await?;
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert_eq!(json(&r.body)["field"], field, "{bad}");
    }
    assert!(ns.api::<Bake>().list(&Default::default()).await?.items.is_empty());

    // With the token: packer's output, then the final line.
    let streamed = tokio::time::timeout(
        BAKE_TIMEOUT,
        request(&http, "POST", &path, &[("Authorization", &auth)]),
    )
    .await??;
    assert_eq!(streamed.status, 200, "{streamed:?}");
    let lines: Vec<&str> = streamed.body.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.contains("created")),
        "{}",
        streamed.body
    );
    assert!(
        streamed.body.contains("amazon-ebs"),
        "no packer output in:\n{}",
        streamed.body
    );
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("phase=Succeeded amiId=ami-"),
        "last line {last:?}"
    );
    let ami = last.trim_start_matches("phase=Succeeded amiId=").to_string();
    assert!(!streamed.body.contains(TOKEN), "the token leaked into the stream");
    let bakes = ns.api::<Bake>().list(&Default::default()).await?.items;
    assert_eq!(bakes.len(), 1);
    assert_eq!(
        bakes[0].status.as_ref().and_then(|s| s.ami_id.clone()),
        Some(ami.clone())
    );
    assert!(!operator.log().contains(TOKEN), "the token leaked into the log");

    // The live AmiCatalog controller lists the new image (a succeeded Bake refreshes the catalogs
    // of its service at once), and `GET /amis/simple-service` serves it from there.
    let listed = try_wait_until(
        Duration::from_secs(60),
        "GET /amis/simple-service to list the baked image",
        || async {
            let r = request(&http, "GET", "/amis/simple-service", &[("Authorization", &auth)]).await?;
            Ok((r.status == 200 && r.body.contains(&ami)).then_some(r))
        },
    )
    .await?;
    let listed = json(&listed.body);
    assert_eq!(listed["service"], "simple-service", "{listed}");
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_client_that_disconnects_does_not_cancel_its_bake() -> Result<()> {
    let (ns, template, operator, _token) = seed_api("seed-disconnect", &[]).await?;

    let mut stream = tokio::net::TcpStream::connect(&operator.http).await?;
    let req = format!(
        "POST /bake/{template}/gone/2.0.0/hvm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256];
    let n = stream.read(&mut buf).await?;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);

    let bakes = ns.api::<Bake>();
    let name = try_wait_until(Duration::from_secs(30), "the Bake to exist", || async {
        Ok(bakes
            .list(&Default::default())
            .await?
            .items
            .first()
            .map(|b| b.metadata.name.clone().unwrap_or_default()))
    })
    .await?;
    wait_for_phase(&bakes, &name, BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn with_public_reads_amis_list_the_latest_image_of_each_catalog_and_the_newest_of_a_service_without_the_token()
-> Result<()> {
    let (ns, template, operator, _token) = seed_api("seed-amis", &["--seed-api-public-reads"]).await?;

    // A catalog whose status we write ourselves, as the AmiCatalog controller would.
    let service = format!("svc-{}", random_suffix());
    let catalogs: Api<AmiCatalog> = ns.api();
    apply_catalog(&catalogs, "services", &format!("service: {service}")).await?;
    let images: Vec<_> = (0..12)
        .map(|i| {
            serde_json::json!({
                "imageId": format!("ami-{i:08x}"),
                "creationDate": format!("2026-01-{:02}T00:00:00.000Z", i + 1),
                "service": service,
                "version": format!("1.0.{i}"),
            })
        })
        .collect();
    let status = serde_json::json!({
        "apiVersion": "baker.io/v1alpha1",
        "kind": "AmiCatalog",
        "status": {"images": images, "latest": images[11], "count": 12},
    });
    catalogs
        .patch_status(
            "services",
            &PatchParams::apply("baker-tests").force(),
            &Patch::Apply(&status),
        )
        .await?;

    // The API answers from the operator's cache, which shows the status once its watch delivers it.
    let (mine, all) = try_wait_until(
        Duration::from_secs(20),
        "/amis to show the catalog's status",
        || async {
            let all = get(&operator.http, "/amis").await?;
            anyhow::ensure!(all.status == 200, "/amis answered {}: {}", all.status, all.body);
            let all = json(&all.body);
            let mine = all["catalogs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["namespace"] == ns.name())
                .cloned()
                .unwrap_or_default();
            Ok((!mine["latest"].is_null()).then_some((mine, all)))
        },
    )
    .await?;
    assert_eq!(mine["latest"]["imageId"], "ami-0000000b", "{all}");

    let listed = get(&operator.http, &format!("/amis/{service}")).await?;
    assert_eq!(listed.status, 200);
    let ids: Vec<String> = json(&listed.body)["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["imageId"].as_str().map(String::from))
        .collect();
    assert_eq!(ids.len(), 10, "{ids:?}");
    assert_eq!(ids.first().map(String::as_str), Some("ami-0000000b"));
    let bad = get(&operator.http, "/amis/Not_A_Service").await?;
    assert_eq!(bad.status, 400);
    assert_eq!(json(&bad.body)["field"], "service");
    // Public reads open the listings only: baking still needs the token.
    let post = request(
        &operator.http,
        "POST",
        &format!("/bake/{template}/{service}/1.0.0/hvm"),
        &[],
    )
    .await?;
    assert_eq!(post.status, 401, "{post:?}");
    finish(ns).await
}
