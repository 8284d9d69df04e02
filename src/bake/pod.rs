//! The bake pod and its template ConfigMap, built as pure functions of the Bake, its template and
//! the operator's configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HostPathVolumeSource, Pod, PodSecurityContext, PodSpec, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{BakeTemplateSpec, Builder, keys};
use crate::config::OperatorConfig;
use crate::packer::render::MANIFEST_PATH;

pub const CONTAINER: &str = "packer";
pub const TEMPLATE_KEY: &str = "template.json";
const TEMPLATE_DIR: &str = "/bake/template";
const WORK_DIR: &str = "/bake/work";
/// An unprivileged uid for `amazon-ebs` bakes, which need no root.
const BAKE_UID: i64 = 65532;

/// Name of the bake pod (and its template ConfigMap) for a Bake.
pub fn pod_name(bake_name: &str) -> String {
    format!("bake-{bake_name}")
}

/// What the pod builder needs to know about the Bake.
#[derive(Clone, Debug)]
pub struct PodInput<'a> {
    pub bake_name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub service: &'a str,
    pub template: &'a BakeTemplateSpec,
    pub config: &'a OperatorConfig,
}

fn labels(input: &PodInput<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (keys::MANAGED_BY.to_string(), keys::MANAGED_BY_VALUE.to_string()),
        ("app.kubernetes.io/name".to_string(), "baker-bake".to_string()),
        (keys::BAKE_NAME_LABEL.to_string(), input.bake_name.to_string()),
        (keys::SERVICE.to_string(), input.service.to_string()),
    ])
}

fn meta(input: &PodInput<'_>) -> ObjectMeta {
    ObjectMeta {
        name: Some(pod_name(input.bake_name)),
        namespace: Some(input.namespace.to_string()),
        labels: Some(labels(input)),
        owner_references: Some(vec![input.owner.clone()]),
        ..Default::default()
    }
}

/// The ConfigMap holding the rendered Packer template.
pub fn template_config_map(input: &PodInput<'_>, rendered: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(input),
        data: Some(BTreeMap::from([(TEMPLATE_KEY.to_string(), rendered.to_string())])),
        immutable: Some(true),
        ..Default::default()
    }
}

fn env(input: &PodInput<'_>) -> Vec<EnvVar> {
    let plain = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    let mut env = vec![
        // Packer must not phone home: bake pods may have no egress but EC2.
        plain("CHECKPOINT_DISABLE", "1"),
        // Names the Bake on the process, for whoever looks at the node.
        plain("BAKER_BAKE", &format!("{}/{}", input.namespace, input.bake_name)),
        plain("HOME", WORK_DIR),
        plain("TMPDIR", WORK_DIR),
        plain("PACKER_CACHE_DIR", &format!("{WORK_DIR}/packer_cache")),
        plain("AWS_REGION", &input.template.region),
        plain("AWS_DEFAULT_REGION", &input.template.region),
    ];
    if let Some(secret) = &input.config.aws_credentials_secret {
        let from_secret = |name: &str, optional: bool| EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: name.into(),
                    optional: Some(optional),
                }),
                ..Default::default()
            }),
        };
        env.push(from_secret("AWS_ACCESS_KEY_ID", false));
        env.push(from_secret("AWS_SECRET_ACCESS_KEY", false));
        env.push(from_secret("AWS_SESSION_TOKEN", true));
    }
    env
}

/// The bake pod. `amazon-chroot` needs root, privilege and the node's `/dev` to attach and mount
/// EBS volumes; `amazon-ebs` only calls the EC2 API and gets none of that.
pub fn bake_pod(input: &PodInput<'_>) -> Pod {
    let chroot = input.template.builder == Builder::AmazonChroot;
    let settings = input.template.pod.as_ref();
    let mut mounts = vec![
        VolumeMount {
            name: "template".into(),
            mount_path: TEMPLATE_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "work".into(),
            mount_path: WORK_DIR.into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "template".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: pod_name(input.bake_name),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "work".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let security_context = if chroot {
        mounts.push(VolumeMount {
            name: "dev".into(),
            mount_path: "/dev".into(),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "dev".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/dev".into(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        });
        SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            ..Default::default()
        }
    } else {
        SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(BAKE_UID),
            run_as_group: Some(BAKE_UID),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(
            input
                .template
                .packer_image
                .clone()
                .unwrap_or_else(|| input.config.packer_image.clone()),
        ),
        command: Some(vec![
            "packer".into(),
            "build".into(),
            "-color=false".into(),
            format!("{TEMPLATE_DIR}/{TEMPLATE_KEY}"),
        ]),
        working_dir: Some(WORK_DIR.into()),
        env: Some(env(input)),
        volume_mounts: Some(mounts),
        termination_message_path: Some(MANIFEST_PATH.into()),
        // On failure, the end of packer's output becomes the termination message: the operator
        // copies it into the Bake's status.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(security_context),
        resources: settings.and_then(|p| p.resources.clone()),
        ..Default::default()
    };
    Pod {
        metadata: meta(input),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(input.template.timeout_seconds()),
            termination_grace_period_seconds: Some(input.config.bake_grace_seconds),
            service_account_name: input.config.bake_service_account.clone(),
            // Packer needs no Kubernetes API access. IRSA and Pod Identity inject their own token.
            automount_service_account_token: Some(false),
            security_context: (!chroot).then(|| PodSecurityContext {
                fs_group: Some(BAKE_UID),
                ..Default::default()
            }),
            node_selector: settings
                .map(|p| p.node_selector.clone())
                .filter(|n| !n.is_empty()),
            tolerations: settings.map(|p| p.tolerations.clone()).filter(|t| !t.is_empty()),
            affinity: settings.and_then(|p| p.affinity.clone()),
            priority_class_name: settings.and_then(|p| p.priority_class_name.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(builder: Builder) -> BakeTemplateSpec {
        BakeTemplateSpec {
            timeout_seconds: Some(900),
            ..crate::fixtures::template(builder)
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "baker.io/v1alpha1".into(),
            kind: "Bake".into(),
            name: "b".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn pod_for(builder: Builder, config: &OperatorConfig) -> Pod {
        let t = template(builder);
        bake_pod(&PodInput {
            bake_name: "simple-service-1.0.4",
            namespace: "team-a",
            owner: owner(),
            service: "simple-service",
            template: &t,
            config,
        })
    }

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn template_pod_settings_place_the_pod_and_size_its_container() {
        use crate::api::template::BakePodSettings;
        use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut t = template(Builder::AmazonChroot);
        t.pod = Some(BakePodSettings {
            node_selector: BTreeMap::from([("baker.io/chroot".to_string(), "true".to_string())]),
            tolerations: vec![Toleration {
                key: Some("baker.io/chroot".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("cpu".to_string(), Quantity("500m".into()))])),
                ..Default::default()
            }),
            ..Default::default()
        });
        let pod = bake_pod(&PodInput {
            bake_name: "b",
            namespace: "team-a",
            owner: owner(),
            service: "s",
            template: &t,
            config: &OperatorConfig::default(),
        });
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.node_selector
                .as_ref()
                .and_then(|n| n.get("baker.io/chroot"))
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
        let requests = container(&pod)
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref());
        assert_eq!(
            requests.and_then(|r| r.get("cpu")),
            Some(&Quantity("500m".into()))
        );
        // Without settings the pod spec has none of them.
        let plain = pod_for(Builder::AmazonChroot, &OperatorConfig::default());
        let plain_spec = plain.spec.as_ref().unwrap();
        assert!(plain_spec.node_selector.is_none() && plain_spec.tolerations.is_none());
        assert!(container(&plain).resources.is_none());
    }

    #[test]
    fn chroot_pod_is_privileged_with_host_dev() {
        let pod = pod_for(Builder::AmazonChroot, &OperatorConfig::default());
        let sc = container(&pod).security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(true));
        let spec = pod.spec.as_ref().unwrap();
        let dev = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "dev")
            .unwrap();
        assert_eq!(dev.host_path.as_ref().unwrap().path, "/dev");
    }

    #[test]
    fn ebs_pod_has_no_privilege_and_no_host_paths() {
        let pod = pod_for(Builder::AmazonEbs, &OperatorConfig::default());
        let sc = container(&pod).security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let spec = pod.spec.as_ref().unwrap();
        assert!(
            spec.volumes
                .as_ref()
                .unwrap()
                .iter()
                .all(|v| v.host_path.is_none())
        );
    }

    #[test]
    fn pod_runs_once_within_the_template_deadline_and_is_owned_by_the_bake() {
        let pod = pod_for(Builder::AmazonEbs, &OperatorConfig::default());
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(900));
        assert_eq!(pod.metadata.name.as_deref(), Some("bake-simple-service-1.0.4"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        let c = container(&pod);
        assert_eq!(c.termination_message_path.as_deref(), Some(MANIFEST_PATH));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            c.command.as_ref().unwrap()[..2],
            ["packer".to_string(), "build".to_string()]
        );
    }

    #[test]
    fn credentials_come_from_the_named_secret_never_as_literals() {
        let config = OperatorConfig {
            aws_credentials_secret: Some("aws".into()),
            ..Default::default()
        };
        let pod = pod_for(Builder::AmazonEbs, &config);
        let env = container(&pod).env.as_ref().unwrap();
        let key = env.iter().find(|e| e.name == "AWS_SECRET_ACCESS_KEY").unwrap();
        assert!(key.value.is_none());
        let r = key.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (r.name.as_str(), r.key.as_str()),
            ("aws", "AWS_SECRET_ACCESS_KEY")
        );
        let without = pod_for(Builder::AmazonEbs, &OperatorConfig::default());
        assert!(
            container(&without)
                .env
                .as_ref()
                .unwrap()
                .iter()
                .all(|e| !e.name.starts_with("AWS_SECRET"))
        );
    }

    #[test]
    fn template_config_map_is_immutable_and_shares_the_pod_name() {
        let t = template(Builder::AmazonEbs);
        let input = PodInput {
            bake_name: "b",
            namespace: "n",
            owner: owner(),
            service: "s",
            template: &t,
            config: &OperatorConfig::default(),
        };
        let cm = template_config_map(&input, "{}");
        assert_eq!(cm.metadata.name.as_deref(), Some("bake-b"));
        assert_eq!(cm.immutable, Some(true));
        assert_eq!(cm.data.unwrap()[TEMPLATE_KEY], "{}");
    }
}
