//! Materialising pod volumes under `<pod dir>/volumes/<name>`.
//!
//! ConfigMap, Secret, downward API and projected volumes are written once
//! when the pod starts (kubelet would keep them in sync; the rig does not).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use kube::Client;

use crate::envvars::{PodFields, field_value};
use crate::objects;

/// Kubernetes' default `defaultMode` (0644).
pub const DEFAULT_FILE_MODE: u32 = 0o644;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// Kubelet reports these as `FailedMount` and retries.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {message}")]
    Retry { volume: String, message: String },
    /// The rig cannot provide this volume at all; the pod fails.
    #[error("volume \"{volume}\": {message}")]
    Unsupported { volume: String, message: String },
}

/// One file of a ConfigMap/Secret/downward API/projected volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
    pub owner: Option<u32>,
}

/// Item paths must stay inside the volume.
pub fn validate_rel_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if path.is_empty() {
        return Err("path must not be empty".into());
    }
    if p.is_absolute() {
        return Err(format!("path {path:?} must be relative"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("path {path:?} must not contain '..'"));
    }
    Ok(())
}

fn mode_of(mode: Option<i32>, default: u32) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map(|m| m & 0o7777)
        .unwrap_or(default)
}

fn owner_of(user: Option<i64>) -> Option<u32> {
    user.and_then(|u| u32::try_from(u).ok())
}

/// The files of a ConfigMap or Secret volume: every key, or just `items`.
pub fn key_entries(
    kind: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    default_owner: Option<u32>,
    optional: bool,
) -> Result<Vec<FileEntry>, String> {
    let mut out = Vec::new();
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (k, v) in data {
                validate_rel_path(k)?;
                out.push(FileEntry {
                    path: k.clone(),
                    data: v.clone(),
                    mode: default_mode,
                    owner: default_owner,
                });
            }
        }
        Some(items) => {
            for item in items {
                validate_rel_path(&item.path)?;
                match data.get(&item.key) {
                    Some(v) => out.push(FileEntry {
                        path: item.path.clone(),
                        data: v.clone(),
                        mode: mode_of(item.mode, default_mode),
                        owner: owner_of(item.user).or(default_owner),
                    }),
                    None if optional => {}
                    None if kind == "configmap" => {
                        return Err(format!(
                            "configmap references non-existent config key: {}",
                            item.key
                        ));
                    }
                    None => {
                        return Err(format!("references non-existent secret key: {}", item.key));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// kubelet's `fieldpath.FormatMap`: sorted `key="value"` lines.
pub fn format_map(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files of a downward API volume (or projection). Returns the files and
/// the item fields that were skipped as unsupported.
pub fn downward_entries(
    items: &[DownwardAPIVolumeFile],
    fields: &PodFields,
    default_mode: u32,
    default_owner: Option<u32>,
) -> Result<(Vec<FileEntry>, Vec<String>), String> {
    let mut out = Vec::new();
    let mut unsupported = Vec::new();
    for item in items {
        validate_rel_path(&item.path)?;
        let value = if let Some(f) = &item.field_ref {
            match f.field_path.as_str() {
                "metadata.labels" => format_map(&fields.labels),
                "metadata.annotations" => format_map(&fields.annotations),
                p => field_value(fields, p).map_err(|e| e.to_string())?,
            }
        } else {
            unsupported.push(format!("downwardAPI item {:?}: resourceFieldRef", item.path));
            continue;
        };
        out.push(FileEntry {
            path: item.path.clone(),
            data: value.into_bytes(),
            mode: mode_of(item.mode, default_mode),
            owner: owner_of(item.user).or(default_owner),
        });
    }
    Ok((out, unsupported))
}

/// Writes `entries` into a fresh `dir`.
pub fn write_entries(dir: &Path, entries: &[FileEntry]) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in entries {
        let path = dir.join(&e.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &e.data)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode))?;
        if let Some(uid) = e.owner {
            chown(&path, Some(uid), None)?;
        }
    }
    Ok(())
}

/// kubelet's `SetVolumeOwnership` for `fsGroup`: group-own everything, give
/// the group read (and write, for writable volumes) access, setgid dirs.
pub fn apply_fs_group(dir: &Path, gid: u32, writable: bool) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        chown(&p, None, Some(gid))?;
        let mut mode = meta.permissions().mode() & 0o7777;
        mode |= 0o040;
        if writable {
            mode |= 0o020;
        }
        if meta.is_dir() {
            mode |= 0o2010;
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Checks (or creates) a hostPath per its `type`.
pub fn check_host_path(path: &Path, kind: &str) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = || std::fs::metadata(path);
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(path).map_err(|e| format!("cannot create {path:?}: {e}"))
        }
        "FileOrCreate" => {
            if path.exists() {
                return Ok(());
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {parent:?}: {e}"))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|_| ())
                .map_err(|e| format!("cannot create {path:?}: {e}"))
        }
        other => {
            let m = meta().map_err(|_| {
                format!(
                    "hostPath type check failed: {} is not a {}",
                    path.display(),
                    other
                )
            })?;
            let ft = m.file_type();
            let ok = match other {
                "Directory" => ft.is_dir(),
                "File" => ft.is_file(),
                "Socket" => ft.is_socket(),
                "CharDevice" => ft.is_char_device(),
                "BlockDevice" => ft.is_block_device(),
                _ => return Err(format!("invalid hostPath type {other:?}")),
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "hostPath type check failed: {} is not a {}",
                    path.display(),
                    other
                ))
            }
        }
    }
}

/// Name of the first volume source set, for error messages.
fn volume_kind(v: &Volume) -> &'static str {
    let json = serde_json::to_value(v).unwrap_or_default();
    const KNOWN: &[&str] = &[
        "persistentVolumeClaim",
        "ephemeral",
        "image",
        "csi",
        "nfs",
        "iscsi",
        "gitRepo",
        "awsElasticBlockStore",
        "gcePersistentDisk",
        "azureDisk",
        "azureFile",
        "cephfs",
        "cinder",
        "fc",
        "flexVolume",
        "flocker",
        "glusterfs",
        "photonPersistentDisk",
        "portworxVolume",
        "quobyte",
        "rbd",
        "scaleIO",
        "storageos",
        "vsphereVolume",
    ];
    KNOWN
        .iter()
        .find(|k| json.get(**k).is_some())
        .copied()
        .unwrap_or("unknown")
}

/// Result of materialising a pod's volumes.
#[derive(Debug, Default)]
pub struct Materialized {
    /// Host path to bind-mount, per volume name.
    pub paths: HashMap<String, PathBuf>,
    /// Spec fields that were ignored.
    pub unsupported: Vec<String>,
}

/// Creates every volume of `pod` under `pod_dir/volumes`.
pub async fn materialize(
    client: &Client,
    pod: &Pod,
    fields: &PodFields,
    pod_dir: &Path,
) -> Result<Materialized, VolumeError> {
    let mut out = Materialized::default();
    let spec = pod.spec.as_ref();
    let fs_group = spec
        .and_then(|s| s.security_context.as_ref())
        .and_then(|sc| sc.fs_group)
        .and_then(|g| u32::try_from(g).ok());
    let ns = fields.namespace.as_str();
    for vol in spec.and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let name = vol.name.clone();
        let retry = |message: String| VolumeError::Retry {
            volume: name.clone(),
            message,
        };
        let dir = pod_dir.join("volumes").join(&vol.name);
        let io_err = |e: std::io::Error| retry(format!("writing {}: {e}", dir.display()));

        if let Some(hp) = &vol.host_path {
            let path = PathBuf::from(&hp.path);
            check_host_path(&path, hp.type_.as_deref().unwrap_or("")).map_err(retry)?;
            out.paths.insert(name, path);
            continue;
        }

        let writable;
        if let Some(ed) = &vol.empty_dir {
            if ed.medium.as_deref().is_some_and(|m| !m.is_empty()) {
                out.unsupported
                    .push(format!("spec.volumes[{name}].emptyDir.medium"));
            }
            std::fs::create_dir_all(&dir).map_err(io_err)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(io_err)?;
            writable = true;
        } else if let Some(cm) = &vol.config_map {
            let default_mode = mode_of(cm.default_mode, DEFAULT_FILE_MODE);
            let optional = cm.optional.unwrap_or(false);
            let data = objects::configmap_bytes(client, ns, &cm.name)
                .await
                .map_err(|e| retry(e.to_string()))?;
            let data = match data {
                Some(d) => d,
                None if optional => BTreeMap::new(),
                None => return Err(retry(format!("configmap \"{}\" not found", cm.name))),
            };
            let entries = key_entries(
                "configmap",
                &data,
                cm.items.as_deref(),
                default_mode,
                owner_of(cm.default_user),
                optional,
            )
            .map_err(retry)?;
            write_entries(&dir, &entries).map_err(io_err)?;
            writable = false;
        } else if let Some(sec) = &vol.secret {
            let secret_name = sec.secret_name.clone().unwrap_or_default();
            let default_mode = mode_of(sec.default_mode, DEFAULT_FILE_MODE);
            let optional = sec.optional.unwrap_or(false);
            let data = objects::secret_bytes(client, ns, &secret_name)
                .await
                .map_err(|e| retry(e.to_string()))?;
            let data = match data {
                Some(d) => d,
                None if optional => BTreeMap::new(),
                None => return Err(retry(format!("secret \"{secret_name}\" not found"))),
            };
            let entries = key_entries(
                "secret",
                &data,
                sec.items.as_deref(),
                default_mode,
                owner_of(sec.default_user),
                optional,
            )
            .map_err(retry)?;
            write_entries(&dir, &entries).map_err(io_err)?;
            writable = false;
        } else if let Some(dapi) = &vol.downward_api {
            let (entries, unsupported) = downward_entries(
                dapi.items.as_deref().unwrap_or_default(),
                fields,
                mode_of(dapi.default_mode, DEFAULT_FILE_MODE),
                owner_of(dapi.default_user),
            )
            .map_err(retry)?;
            out.unsupported.extend(unsupported);
            write_entries(&dir, &entries).map_err(io_err)?;
            writable = false;
        } else if let Some(proj) = &vol.projected {
            let default_mode = mode_of(proj.default_mode, DEFAULT_FILE_MODE);
            let default_owner = owner_of(proj.default_user);
            let mut entries = Vec::new();
            for src in proj.sources.iter().flatten() {
                if let Some(cm) = &src.config_map {
                    let optional = cm.optional.unwrap_or(false);
                    let data = objects::configmap_bytes(client, ns, &cm.name)
                        .await
                        .map_err(|e| retry(e.to_string()))?;
                    let data = match data {
                        Some(d) => d,
                        None if optional => continue,
                        None => {
                            return Err(retry(format!("configmap \"{}\" not found", cm.name)));
                        }
                    };
                    entries.extend(
                        key_entries(
                            "configmap",
                            &data,
                            cm.items.as_deref(),
                            default_mode,
                            default_owner,
                            optional,
                        )
                        .map_err(retry)?,
                    );
                } else if let Some(sec) = &src.secret {
                    let optional = sec.optional.unwrap_or(false);
                    let data = objects::secret_bytes(client, ns, &sec.name)
                        .await
                        .map_err(|e| retry(e.to_string()))?;
                    let data = match data {
                        Some(d) => d,
                        None if optional => continue,
                        None => return Err(retry(format!("secret \"{}\" not found", sec.name))),
                    };
                    entries.extend(
                        key_entries(
                            "secret",
                            &data,
                            sec.items.as_deref(),
                            default_mode,
                            default_owner,
                            optional,
                        )
                        .map_err(retry)?,
                    );
                } else if let Some(dapi) = &src.downward_api {
                    let (files, unsupported) = downward_entries(
                        dapi.items.as_deref().unwrap_or_default(),
                        fields,
                        default_mode,
                        default_owner,
                    )
                    .map_err(retry)?;
                    out.unsupported.extend(unsupported);
                    entries.extend(files);
                } else if let Some(tok) = &src.service_account_token {
                    validate_rel_path(&tok.path).map_err(retry)?;
                    let sa = if fields.service_account_name.is_empty() {
                        "default"
                    } else {
                        fields.service_account_name.as_str()
                    };
                    let token = objects::service_account_token(
                        client,
                        ns,
                        sa,
                        &fields.name,
                        &fields.uid,
                        tok.audience.as_deref(),
                        tok.expiration_seconds,
                    )
                    .await
                    .map_err(|e| retry(format!("failed to fetch token: {e}")))?;
                    entries.push(FileEntry {
                        path: tok.path.clone(),
                        data: token.into_bytes(),
                        mode: default_mode,
                        owner: owner_of(tok.user).or(default_owner),
                    });
                } else {
                    return Err(VolumeError::Unsupported {
                        volume: name.clone(),
                        message: "projected sources other than configMap, secret, downwardAPI \
                                  and serviceAccountToken are not supported by baker-rig-node"
                            .into(),
                    });
                }
            }
            write_entries(&dir, &entries).map_err(io_err)?;
            writable = false;
        } else {
            return Err(VolumeError::Unsupported {
                volume: name.clone(),
                message: format!("{} volumes are not supported by baker-rig-node", volume_kind(vol)),
            });
        }
        if let Some(gid) = fs_group {
            apply_fs_group(&dir, gid, writable).map_err(io_err)?;
        }
        out.paths.insert(name, dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectFieldSelector;

    fn data() -> BTreeMap<String, Vec<u8>> {
        [("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())]
            .into_iter()
            .collect()
    }

    fn item(key: &str, path: &str, mode: Option<i32>) -> KeyToPath {
        KeyToPath {
            key: key.into(),
            path: path.into(),
            mode,
            user: None,
        }
    }

    #[test]
    fn all_keys_without_items() {
        let e = key_entries("configmap", &data(), None, 0o600, None, false).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].path, "a");
        assert_eq!(e[0].mode, 0o600);
    }

    #[test]
    fn items_select_and_rename() {
        let items = [item("b", "sub/file", Some(0o400))];
        let e = key_entries("secret", &data(), Some(&items), 0o644, Some(7), false).unwrap();
        assert_eq!(
            e,
            vec![FileEntry {
                path: "sub/file".into(),
                data: b"2".to_vec(),
                mode: 0o400,
                owner: Some(7),
            }]
        );
    }

    #[test]
    fn missing_item_keys() {
        let items = [item("zz", "z", None)];
        assert_eq!(
            key_entries("configmap", &data(), Some(&items), 0o644, None, false),
            Err("configmap references non-existent config key: zz".into())
        );
        assert_eq!(
            key_entries("secret", &data(), Some(&items), 0o644, None, false),
            Err("references non-existent secret key: zz".into())
        );
        assert!(
            key_entries("secret", &data(), Some(&items), 0o644, None, true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn paths_stay_inside() {
        assert!(validate_rel_path("a/b").is_ok());
        assert!(validate_rel_path("/etc/passwd").is_err());
        assert!(validate_rel_path("../x").is_err());
        assert!(validate_rel_path("a/../../x").is_err());
        assert!(validate_rel_path("").is_err());
    }

    #[test]
    fn downward_files() {
        let fields = PodFields {
            name: "p".into(),
            namespace: "ns".into(),
            labels: [("b".to_string(), "2".to_string()), ("a".into(), "x\"y".into())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let mk = |path: &str, field: &str| DownwardAPIVolumeFile {
            path: path.into(),
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                api_version: None,
            }),
            ..Default::default()
        };
        let items = vec![
            mk("ns", "metadata.namespace"),
            mk("labels", "metadata.labels"),
            DownwardAPIVolumeFile {
                path: "cpu".into(),
                resource_field_ref: Some(Default::default()),
                ..Default::default()
            },
        ];
        let (files, unsupported) = downward_entries(&items, &fields, 0o644, None).unwrap();
        assert_eq!(files[0].data, b"ns");
        assert_eq!(
            String::from_utf8(files[1].data.clone()).unwrap(),
            "a=\"x\\\"y\"\nb=\"2\""
        );
        assert_eq!(unsupported.len(), 1);
    }

    #[test]
    fn write_and_host_path_types() {
        let dir = std::env::temp_dir().join(format!("baker-rig-node-vol-{}", std::process::id()));
        let entries = vec![FileEntry {
            path: "d/f".into(),
            data: b"x".to_vec(),
            mode: 0o600,
            owner: None,
        }];
        write_entries(&dir, &entries).unwrap();
        let f = dir.join("d/f");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(check_host_path(&dir, "Directory").is_ok());
        assert!(check_host_path(&f, "Directory").is_err());
        assert!(check_host_path(&f, "File").is_ok());
        let created = dir.join("new/dir");
        assert!(check_host_path(&created, "DirectoryOrCreate").is_ok());
        assert!(created.is_dir());
        let file = dir.join("new/file");
        assert!(check_host_path(&file, "FileOrCreate").is_ok());
        assert!(file.is_file());
        assert!(check_host_path(&dir.join("missing"), "File").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
