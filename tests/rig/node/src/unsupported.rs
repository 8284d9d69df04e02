//! Pod spec fields the rig does not honour. Each one becomes a Warning
//! event with reason `Unsupported`, so a test that relies on one notices.

use k8s_openapi::api::core::v1::{Container, Pod, SecurityContext};

/// One ignored field: the container it belongs to (for the event's
/// fieldPath) and a description naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub container: Option<String>,
    pub field: String,
    /// What the rig does instead, when it does more than ignore the field.
    pub instead: Option<&'static str>,
}

impl Unsupported {
    pub fn message(&self) -> String {
        message(&self.field, self.instead)
    }
}

pub fn message(field: &str, instead: Option<&str>) -> String {
    match instead {
        Some(i) => format!("{field} is not supported by baker-rig-node: {i}"),
        None => format!("{field} is not supported by baker-rig-node and is ignored"),
    }
}

fn non_empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_empty())
}

fn security_context_fields(sc: &SecurityContext) -> Vec<&'static str> {
    let mut f = Vec::new();
    if sc.run_as_non_root.is_some() {
        f.push("runAsNonRoot");
    }
    if sc.capabilities.is_some() {
        f.push("capabilities");
    }
    if sc.read_only_root_filesystem == Some(true) {
        f.push("readOnlyRootFilesystem");
    }
    if sc.allow_privilege_escalation.is_some() {
        f.push("allowPrivilegeEscalation");
    }
    if sc.seccomp_profile.is_some() {
        f.push("seccompProfile");
    }
    if sc.se_linux_options.is_some() {
        f.push("seLinuxOptions");
    }
    if sc.app_armor_profile.is_some() {
        f.push("appArmorProfile");
    }
    if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
        f.push("procMount");
    }
    f
}

fn container_fields(c: &Container) -> Vec<String> {
    let mut f: Vec<String> = Vec::new();
    let mut add = |s: &str| f.push(s.to_string());
    if c.liveness_probe.is_some() {
        add("livenessProbe");
    }
    if c.readiness_probe.is_some() {
        add("readinessProbe");
    }
    if c.startup_probe.is_some() {
        add("startupProbe");
    }
    if c.lifecycle.is_some() {
        add("lifecycle");
    }
    if non_empty(&c.ports) {
        add("ports");
    }
    if let Some(r) = &c.resources {
        if r.limits.as_ref().is_some_and(|l| !l.is_empty()) {
            add("resources.limits");
        }
        if non_empty(&r.claims) {
            add("resources.claims");
        }
    }
    if c.stdin == Some(true) {
        add("stdin");
    }
    if c.tty == Some(true) {
        add("tty");
    }
    if non_empty(&c.volume_devices) {
        add("volumeDevices");
    }
    if c.restart_policy.is_some() {
        add("restartPolicy");
    }
    if non_empty(&c.restart_policy_rules) {
        add("restartPolicyRules");
    }
    if let Some(sc) = &c.security_context {
        for s in security_context_fields(sc) {
            add(&format!("securityContext.{s}"));
        }
    }
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
            add(&format!("volumeMounts[{}].mountPropagation", m.name));
        }
        if m.recursive_read_only.as_deref().is_some_and(|p| p != "Disabled") {
            add(&format!("volumeMounts[{}].recursiveReadOnly", m.name));
        }
    }
    f
}

/// Every unsupported field of `pod`.
pub fn unsupported_fields(pod: &Pod) -> Vec<Unsupported> {
    let mut out = Vec::new();
    let Some(spec) = &pod.spec else {
        return out;
    };
    let mut pod_field = |field: String| {
        out.push(Unsupported {
            container: None,
            field,
            instead: None,
        })
    };
    if non_empty(&spec.init_containers) {
        pod_field("spec.initContainers".into());
    }
    if non_empty(&spec.ephemeral_containers) {
        pod_field("spec.ephemeralContainers".into());
    }
    match spec.restart_policy.as_deref() {
        None | Some("Never") => {}
        Some(other) => out.push(Unsupported {
            container: None,
            field: format!("spec.restartPolicy: {other}"),
            instead: Some("containers are never restarted (treated as Never)"),
        }),
    }
    let mut pod_field = |field: String| {
        out.push(Unsupported {
            container: None,
            field,
            instead: None,
        })
    };
    if non_empty(&spec.host_aliases) {
        pod_field("spec.hostAliases".into());
    }
    if spec.dns_config.is_some() {
        pod_field("spec.dnsConfig".into());
    }
    if non_empty(&spec.readiness_gates) {
        pod_field("spec.readinessGates".into());
    }
    if spec.share_process_namespace == Some(true) {
        pod_field("spec.shareProcessNamespace".into());
    }
    if non_empty(&spec.resource_claims) {
        pod_field("spec.resourceClaims".into());
    }
    if spec.host_users == Some(false) {
        pod_field("spec.hostUsers".into());
    }
    if spec
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| !l.is_empty())
    {
        pod_field("spec.resources.limits".into());
    }
    if let Some(sc) = &spec.security_context {
        if non_empty(&sc.sysctls) {
            pod_field("spec.securityContext.sysctls".into());
        }
        if sc.run_as_non_root.is_some() {
            pod_field("spec.securityContext.runAsNonRoot".into());
        }
        if sc.seccomp_profile.is_some() {
            pod_field("spec.securityContext.seccompProfile".into());
        }
        if sc.se_linux_options.is_some() {
            pod_field("spec.securityContext.seLinuxOptions".into());
        }
        if sc.app_armor_profile.is_some() {
            pod_field("spec.securityContext.appArmorProfile".into());
        }
    }
    for c in &spec.containers {
        for f in container_fields(c) {
            out.push(Unsupported {
                container: Some(c.name.clone()),
                field: format!("spec.containers{{{}}}.{f}", c.name),
                instead: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, Probe};

    #[test]
    fn lists_fields() {
        let pod = Pod {
            spec: Some(PodSpec {
                restart_policy: Some("OnFailure".into()),
                init_containers: Some(vec![Container::default()]),
                containers: vec![Container {
                    name: "c".into(),
                    liveness_probe: Some(Probe::default()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let u = unsupported_fields(&pod);
        assert_eq!(u.len(), 3);
        assert_eq!(u[0].field, "spec.initContainers");
        assert_eq!(u[1].field, "spec.restartPolicy: OnFailure");
        assert!(u[1].message().contains("treated as Never"));
        assert_eq!(u[2].container.as_deref(), Some("c"));
        assert_eq!(u[2].field, "spec.containers{c}.livenessProbe");
        assert!(u[2].message().contains("livenessProbe"));
    }

    #[test]
    fn plain_pod_has_none() {
        let pod = Pod {
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(unsupported_fields(&pod).is_empty());
    }
}
