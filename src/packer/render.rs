//! Rendering a Packer JSON template from a Bake and its BakeTemplate. Pure: same inputs, same
//! bytes, so a re-render after an operator restart gives the pod the very template it had.
//!
//! The Bake's values never become template or shell text: they travel as Packer user variables
//! (`{{user `service`}}`) and reach provisioning steps as environment variables. Admission
//! already restricts them to safe characters; this is the second line of defence.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::api::{
    BakeSpec, BakeTemplateSpec, Builder, Communicator, ImageFilter, keys, template::DEFAULT_AMI_NAME,
};

/// Where the manifest post-processor writes: the bake container's termination message file, so
/// the AMI id comes back to the operator in the pod status.
pub const MANIFEST_PATH: &str = "/dev/termination-log";

/// Default EC2 instance type for `amazon-ebs` builds.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";
/// Default SSH user on the source image.
pub const DEFAULT_SSH_USERNAME: &str = "ec2-user";

/// Identity of the Bake being rendered, beyond its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BakeIdentity {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

/// The source image, as far as it is known.
#[derive(Clone, Debug, PartialEq)]
pub enum ResolvedSource {
    /// A concrete AMI id (the operator always resolves before launching).
    AmiId(String),
    /// Not resolved: Packer resolves it itself with `source_ami_filter` (used by
    /// `baker template render` without AWS access).
    Filter(ImageFilter),
}

/// Everything the renderer needs.
#[derive(Clone, Debug)]
pub struct RenderInput<'a> {
    pub bake: &'a BakeSpec,
    pub identity: &'a BakeIdentity,
    pub template_name: &'a str,
    pub template: &'a BakeTemplateSpec,
    pub source: ResolvedSource,
    /// EC2 endpoint to use when the template sets none (the operator's own).
    pub default_ec2_endpoint: Option<&'a str>,
    /// The bake key, tagged on the AMI as `baker.io/bake-key` (empty while computing the key).
    pub bake_key: &'a str,
}

/// Reasons a template cannot be rendered. Admission catches most of these; a template applied
/// before a schema change, or one crafted against an older CRD, still gets a clear message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(
        "amiName {0:?} has an unknown placeholder {{{1}}}; known: service, version, virtualizationType, template, timestamp"
    )]
    UnknownPlaceholder(String, String),
    #[error("source image: set exactly one of amiId or filter")]
    AmbiguousSource,
    #[error("provisioners need a communicator, but the template's communicator is none")]
    ProvisionersWithoutCommunicator,
    #[error("template text may not contain Packer template delimiters ({{{{ or }}}}) in {0}")]
    TemplateDelimiters(&'static str),
    #[error("{0} may not contain control characters (newlines, tabs, escapes)")]
    ControlCharacters(&'static str),
    #[error("source image {0:?} is not an AMI id (ami- and 8 to 17 hex digits)")]
    SourceAmiShape(String),
    #[error(
        "{what} would be {length} characters for this Bake; EC2 allows {max}. Shorten the template's pattern or the Bake's service or version"
    )]
    TooLong {
        what: &'static str,
        length: usize,
        max: usize,
    },
    #[error(
        "amiName {0:?} has characters EC2 refuses in AMI names; allowed: letters, digits, spaces and ( ) [ ] . / - ' @ _"
    )]
    AmiNameCharacters(String),
}

/// Longest AMI name EC2 accepts.
const MAX_AMI_NAME: usize = 128;
/// Longest AMI description EC2 accepts.
const MAX_AMI_DESCRIPTION: usize = 255;
/// Characters of `{{timestamp}}` (Unix seconds, ten digits until the year 2286).
const TIMESTAMP_LEN: usize = 10;

/// Refuses what could make a literal value act as Packer template text or break the JSON's
/// meaning for a reader: admission refuses these already; this holds for objects that reached
/// the renderer without it (an older CRD, a direct write of the status subresource's parent).
fn check_literal(what: &'static str, value: &str) -> Result<(), RenderError> {
    if value.contains("{{") || value.contains("}}") {
        return Err(RenderError::TemplateDelimiters(what));
    }
    if value.chars().any(char::is_control) {
        return Err(RenderError::ControlCharacters(what));
    }
    Ok(())
}

/// An AMI id as EC2 writes them; anything else read from a catalog's status or a template is
/// refused before it reaches Packer.
pub fn is_ami_id(id: &str) -> bool {
    id.strip_prefix("ami-")
        .is_some_and(|hex| (8..=17).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Every value the renderer writes as literal text into the template, checked.
fn check_inputs(input: &RenderInput<'_>) -> Result<(), RenderError> {
    let t = input.template;
    let b = input.bake;
    let id = input.identity;
    for (what, value) in [
        ("the Bake's service", b.service.as_str()),
        ("the Bake's version", b.version.as_str()),
        ("the Bake's name", id.name.as_str()),
        ("the Bake's namespace", id.namespace.as_str()),
        ("the Bake's uid", id.uid.as_str()),
        ("the template's name", input.template_name),
        ("the bake key", input.bake_key),
        ("region", t.region.as_str()),
        ("instanceType", t.instance_type.as_deref().unwrap_or_default()),
        ("sshUsername", t.ssh_username.as_deref().unwrap_or_default()),
        ("ec2Endpoint", t.ec2_endpoint.as_deref().unwrap_or_default()),
        (
            "the operator's EC2 endpoint",
            input.default_ec2_endpoint.unwrap_or_default(),
        ),
    ] {
        check_literal(what, value)?;
    }
    for (k, v) in &t.tags {
        check_literal("a tag key", k)?;
        check_literal("a tag value", v)?;
    }
    match &input.source {
        ResolvedSource::AmiId(ami) if !is_ami_id(ami) => {
            return Err(RenderError::SourceAmiShape(ami.clone()));
        }
        ResolvedSource::AmiId(_) => {}
        ResolvedSource::Filter(f) => {
            check_literal("the source filter's name", f.name.as_deref().unwrap_or_default())?;
            for owner in &f.owners {
                check_literal("the source filter's owners", owner)?;
            }
            for (k, v) in &f.tags {
                check_literal("the source filter's tags", k)?;
                check_literal("the source filter's tags", v)?;
            }
        }
    }
    Ok(())
}

/// The characters Packer's `clean_resource_name` keeps; it replaces any other with `-`, one for
/// one, so a value's length survives cleaning.
fn ami_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c)
}

/// How long `pattern` expands for this Bake, and whether its literal text is fit for an AMI name.
fn expanded_len(pattern: &str, input: &RenderInput<'_>) -> (usize, bool) {
    let mut len = 0;
    let mut literal_ok = true;
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        let literal = &rest[..start];
        len += literal.chars().count();
        literal_ok &= literal.chars().all(ami_name_char);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            break;
        };
        len += match &after[..end] {
            "service" => input.bake.service.chars().count(),
            "version" => input.bake.version.chars().count(),
            "virtualizationType" => input.bake.virtualization_type.as_str().len(),
            "template" => input.template_name.chars().count(),
            _ => TIMESTAMP_LEN,
        };
        rest = &after[end + 1..];
    }
    len += rest.chars().count();
    literal_ok &= rest.chars().all(ami_name_char);
    (len, literal_ok)
}

/// The Packer user variables every rendered template defines.
fn variables(input: &RenderInput<'_>) -> Map<String, Value> {
    let mut vars = Map::new();
    let mut put = |k: &str, v: &str| {
        vars.insert(k.to_string(), Value::String(v.to_string()));
    };
    put("service", &input.bake.service);
    put("version", &input.bake.version);
    put("virtualization_type", input.bake.virtualization_type.as_str());
    put("template", input.template_name);
    put("bake_name", &input.identity.name);
    put("bake_namespace", &input.identity.namespace);
    put("bake_uid", &input.identity.uid);
    put("bake_key", input.bake_key);
    vars
}

fn user(var: &str) -> String {
    format!("{{{{user `{var}`}}}}")
}

/// Expands `{placeholder}`s into Packer expressions. AMI names only allow a few characters, so
/// Bake values pass through `clean_resource_name`.
fn expand_name(pattern: &str) -> Result<String, RenderError> {
    if pattern.contains("{{") || pattern.contains("}}") {
        return Err(RenderError::TemplateDelimiters("amiName/amiDescription"));
    }
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        let expr = match name {
            "service" => "{{user `service` | clean_resource_name}}".to_string(),
            "version" => "{{user `version` | clean_resource_name}}".to_string(),
            "virtualizationType" => "{{user `virtualization_type`}}".to_string(),
            "template" => "{{user `template` | clean_resource_name}}".to_string(),
            "timestamp" => "{{timestamp}}".to_string(),
            other => {
                return Err(RenderError::UnknownPlaceholder(
                    pattern.to_string(),
                    other.to_string(),
                ));
            }
        };
        out.push_str(&expr);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Tags Baker puts on the AMI, its snapshots and every temporary resource; template tags first,
/// so Baker's own keys win.
fn tags(input: &RenderInput<'_>, with_source: bool) -> Map<String, Value> {
    let mut tags: BTreeMap<String, String> = input.template.tags.clone();
    tags.insert(keys::BAKE_UID.into(), user("bake_uid"));
    tags.insert(keys::BAKE_KEY.into(), user("bake_key"));
    tags.insert(
        keys::BAKE.into(),
        format!("{}/{}", user("bake_namespace"), user("bake_name")),
    );
    tags.insert(keys::NAMESPACE.into(), user("bake_namespace"));
    tags.insert(keys::SERVICE.into(), user("service"));
    tags.insert(keys::VERSION.into(), user("version"));
    tags.insert(keys::TEMPLATE.into(), user("template"));
    tags.insert(keys::VIRTUALIZATION_TYPE.into(), user("virtualization_type"));
    if with_source {
        // Packer fills in the source AMI it actually used (lineage).
        tags.insert(keys::SOURCE_AMI.into(), "{{ .SourceAMI }}".into());
    }
    tags.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
}

fn source_filter(filter: &ImageFilter, input: &RenderInput<'_>) -> Value {
    let mut filters = Map::new();
    if let Some(name) = &filter.name {
        filters.insert(
            "name".into(),
            Value::String(name.replace("{virtualizationType}", input.bake.virtualization_type.as_str())),
        );
    }
    filters.insert(
        "virtualization-type".into(),
        Value::String(user("virtualization_type")),
    );
    filters.insert("state".into(), Value::String("available".into()));
    for (k, v) in &filter.tags {
        filters.insert(format!("tag:{k}"), Value::String(v.clone()));
    }
    json!({ "owners": filter.owners, "most_recent": true, "filters": filters })
}

fn builder(input: &RenderInput<'_>) -> Result<Value, RenderError> {
    let t = input.template;
    let pattern = t.ami_name.as_deref().unwrap_or(DEFAULT_AMI_NAME);
    let ami_name = expand_name(pattern)?;
    let (length, literal_ok) = expanded_len(pattern, input);
    if !literal_ok {
        return Err(RenderError::AmiNameCharacters(pattern.to_string()));
    }
    if length > MAX_AMI_NAME {
        return Err(RenderError::TooLong {
            what: "the AMI name",
            length,
            max: MAX_AMI_NAME,
        });
    }
    let mut b = Map::new();
    b.insert("type".into(), json!(t.builder.as_str()));
    b.insert("region".into(), json!(t.region));
    match &input.source {
        ResolvedSource::AmiId(id) => {
            b.insert("source_ami".into(), json!(id));
        }
        ResolvedSource::Filter(filter) => {
            b.insert("source_ami_filter".into(), source_filter(filter, input));
        }
    }
    b.insert("ami_name".into(), json!(ami_name));
    let described = t.ami_description.as_deref().unwrap_or(DEFAULT_DESCRIPTION);
    let description = match &t.ami_description {
        Some(d) => expand_name(d)?,
        // Written without `clean_resource_name`: descriptions take any character.
        None => format!(
            "{} {} ({}), baked by Baker",
            user("service"),
            user("version"),
            user("template")
        ),
    };
    let length = expanded_len(described, input).0;
    if length > MAX_AMI_DESCRIPTION {
        return Err(RenderError::TooLong {
            what: "the AMI description",
            length,
            max: MAX_AMI_DESCRIPTION,
        });
    }
    b.insert("ami_description".into(), json!(description));
    b.insert(
        "ami_virtualization_type".into(),
        json!(user("virtualization_type")),
    );
    b.insert("tags".into(), Value::Object(tags(input, true)));
    b.insert("snapshot_tags".into(), Value::Object(tags(input, true)));
    match t.builder {
        Builder::AmazonEbs => {
            b.insert(
                "instance_type".into(),
                json!(t.instance_type.as_deref().unwrap_or(DEFAULT_INSTANCE_TYPE)),
            );
            b.insert("run_tags".into(), Value::Object(tags(input, false)));
            b.insert("run_volume_tags".into(), Value::Object(tags(input, false)));
            match t.communicator() {
                Communicator::None => {
                    b.insert("communicator".into(), json!("none"));
                }
                Communicator::Ssh => {
                    b.insert("communicator".into(), json!("ssh"));
                    b.insert(
                        "ssh_username".into(),
                        json!(t.ssh_username.as_deref().unwrap_or(DEFAULT_SSH_USERNAME)),
                    );
                }
            }
        }
        Builder::AmazonChroot => {}
    }
    if let Some(endpoint) = t.ec2_endpoint.as_deref().or(input.default_ec2_endpoint) {
        b.insert("custom_endpoint_ec2".into(), json!(endpoint));
        // EC2-compatible endpoints serve no metadata API and may not know every region name.
        b.insert("skip_region_validation".into(), json!(true));
        b.insert("skip_metadata_api_check".into(), json!(true));
    }
    Ok(Value::Object(b))
}

fn provisioners(input: &RenderInput<'_>) -> Result<Vec<Value>, RenderError> {
    let t = input.template;
    if t.provisioners.is_empty() {
        return Ok(vec![]);
    }
    if t.builder == Builder::AmazonEbs && t.communicator() == Communicator::None {
        return Err(RenderError::ProvisionersWithoutCommunicator);
    }
    let env = vec![
        format!("BAKE_SERVICE={}", user("service")),
        format!("BAKE_VERSION={}", user("version")),
        format!("BAKE_VIRTUALIZATION_TYPE={}", user("virtualization_type")),
        format!("BAKE_NAME={}", user("bake_name")),
        format!("BAKE_NAMESPACE={}", user("bake_namespace")),
    ];
    t.provisioners
        .iter()
        .map(|p| {
            let mut inline = Vec::with_capacity(p.shell.len() + 1);
            if let Some(name) = &p.name {
                if name.contains("{{") || name.contains("}}") {
                    return Err(RenderError::TemplateDelimiters("provisioner name"));
                }
                inline.push(format!("echo '==> step: {}'", name.replace('\'', "")));
            }
            inline.extend(p.shell.iter().cloned());
            Ok(json!({ "type": "shell", "inline": inline, "environment_vars": env }))
        })
        .collect()
}

/// The AMI description when the template sets none, as a pattern (for its length).
const DEFAULT_DESCRIPTION: &str = "{service} {version} ({template}), baked by Baker";

/// Renders the Packer template (JSON, which Packer 1.x and current Packer both read).
pub fn render(input: &RenderInput<'_>) -> Result<Value, RenderError> {
    check_inputs(input)?;
    let builder = builder(input)?;
    let provisioners = provisioners(input)?;
    let mut root = Map::new();
    root.insert(
        "description".into(),
        json!(format!(
            "Rendered by Baker for Bake {}/{} (template {}). Generated: change the BakeTemplate, not this file.",
            input.identity.namespace, input.identity.name, input.template_name
        )),
    );
    root.insert("variables".into(), Value::Object(variables(input)));
    root.insert("builders".into(), json!([builder]));
    if !provisioners.is_empty() {
        root.insert("provisioners".into(), Value::Array(provisioners));
    }
    root.insert(
        "post-processors".into(),
        json!([{
            "type": "manifest",
            "output": MANIFEST_PATH,
            "strip_path": true,
            "custom_data": { "bake_uid": user("bake_uid") }
        }]),
    );
    Ok(Value::Object(root))
}

/// Renders to pretty JSON text, as stored in the bake's ConfigMap.
pub fn render_string(input: &RenderInput<'_>) -> Result<String, RenderError> {
    let value = render(input)?;
    // Serialising a `Value` cannot fail: all keys are strings.
    Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::template::{Provisioner, SourceImage};
    use crate::fixtures;

    fn ebs_template() -> BakeTemplateSpec {
        let mut t = fixtures::template(Builder::AmazonEbs);
        t.provisioners = vec![Provisioner {
            name: Some("install the service".into()),
            shell: vec!["sudo yum install -y \"$BAKE_SERVICE-$BAKE_VERSION\"".into()],
        }];
        t.tags = BTreeMap::from([("team".to_string(), "platform".to_string())]);
        t
    }

    fn bake() -> BakeSpec {
        fixtures::bake_spec("1.0.4")
    }

    fn identity() -> BakeIdentity {
        BakeIdentity {
            name: "simple-service-1.0.4".into(),
            namespace: "team-a".into(),
            uid: "uid-1".into(),
        }
    }

    #[test]
    fn ami_name_placeholders_become_packer_user_variables() {
        assert_eq!(
            expand_name("{service}-{version}-{virtualizationType}-{timestamp}").unwrap(),
            "{{user `service` | clean_resource_name}}-{{user `version` | clean_resource_name}}-{{user `virtualization_type`}}-{{timestamp}}"
        );
    }

    #[test]
    fn unknown_placeholder_is_an_error_naming_it() {
        let err = expand_name("{service}-{colour}").unwrap_err();
        assert!(err.to_string().contains("{colour}"), "{err}");
    }

    fn input_with<'a>(
        t: &'a BakeTemplateSpec,
        b: &'a BakeSpec,
        id: &'a BakeIdentity,
        source: ResolvedSource,
    ) -> RenderInput<'a> {
        RenderInput {
            bake: b,
            identity: id,
            template_name: "ebs-example",
            template: t,
            source,
            default_ec2_endpoint: None,
            bake_key: "",
        }
    }

    fn render_with(t: &BakeTemplateSpec, b: &BakeSpec) -> Result<Value, RenderError> {
        let id = identity();
        render(&input_with(
            t,
            b,
            &id,
            ResolvedSource::AmiId("ami-0123456789abcdef0".into()),
        ))
    }

    #[test]
    fn packer_delimiters_or_control_characters_in_any_literal_value_are_refused() {
        let b = bake();
        type Edit = Box<dyn Fn(&mut BakeTemplateSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "instanceType",
                Box::new(|t| t.instance_type = Some("t3.{{env `X`}}".into())),
            ),
            (
                "sshUsername",
                Box::new(|t| t.ssh_username = Some("{{user `x`}}".into())),
            ),
            ("region", Box::new(|t| t.region = "eu-west-1}}".into())),
            (
                "a tag value",
                Box::new(|t| {
                    t.tags.insert("team".into(), "{{timestamp}}".into());
                }),
            ),
            (
                "a tag key",
                Box::new(|t| {
                    t.tags.insert("a\nb".replace("\\n", "\n"), "x".into());
                }),
            ),
            (
                "ec2Endpoint",
                Box::new(|t| t.ec2_endpoint = Some("http://x/{{env `AWS_SECRET_ACCESS_KEY`}}".into())),
            ),
        ];
        for (what, edit) in cases {
            let mut t = ebs_template();
            edit(&mut t);
            let err = render_with(&t, &b).expect_err(what);
            assert!(
                matches!(err, RenderError::TemplateDelimiters(w) | RenderError::ControlCharacters(w) if w == what),
                "{what}: {err}"
            );
        }
        let mut evil = bake();
        evil.version = "1.0.{{env `HOME`}}".into();
        assert!(matches!(
            render_with(&ebs_template(), &evil),
            Err(RenderError::TemplateDelimiters("the Bake's version"))
        ));
    }

    #[test]
    fn a_source_filter_with_packer_delimiters_is_refused() {
        let (t, b, id) = (ebs_template(), bake(), identity());
        let filter = ImageFilter {
            name: Some("base-{{timestamp}}".into()),
            ..Default::default()
        };
        assert!(matches!(
            render(&input_with(&t, &b, &id, ResolvedSource::Filter(filter))),
            Err(RenderError::TemplateDelimiters("the source filter's name"))
        ));
    }

    #[test]
    fn a_source_ami_that_is_not_an_ami_id_is_refused() {
        let (t, b, id) = (ebs_template(), bake(), identity());
        for bad in [
            "ami-xyz",
            "ami-0123456789abcdef0123",
            "snap-01234567",
            "ami-0123\"}",
        ] {
            let err = render(&input_with(&t, &b, &id, ResolvedSource::AmiId(bad.into()))).expect_err(bad);
            assert!(matches!(err, RenderError::SourceAmiShape(_)), "{bad}: {err}");
        }
        assert!(is_ami_id("ami-0123abcd") && is_ami_id("ami-0123456789abcdef0"));
    }

    #[test]
    fn an_ami_name_longer_than_ec2_allows_for_this_bake_is_refused_with_its_length() {
        let mut b = bake();
        b.service = "s".repeat(63);
        b.version = "1".repeat(64);
        let err = render_with(&ebs_template(), &b).expect_err("63 + 64 + hvm + timestamp is too long");
        assert_eq!(
            err,
            RenderError::TooLong {
                what: "the AMI name",
                length: 63 + 1 + 64 + 1 + 3 + 1 + 10,
                max: 128
            }
        );
        assert!(render_with(&ebs_template(), &bake()).is_ok());
    }

    #[test]
    fn an_ami_description_longer_than_ec2_allows_is_refused() {
        let mut t = ebs_template();
        t.ami_description = Some(format!("{} {{service}}", "d".repeat(250)));
        let err = render_with(&t, &bake()).expect_err("too long");
        assert!(
            matches!(
                err,
                RenderError::TooLong {
                    what: "the AMI description",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_ami_name_pattern_with_characters_ec2_refuses_is_refused() {
        let mut t = ebs_template();
        t.ami_name = Some("{service}:{version}#{timestamp}".into());
        assert!(matches!(
            render_with(&t, &bake()),
            Err(RenderError::AmiNameCharacters(_))
        ));
    }

    #[test]
    fn packer_delimiters_in_names_are_refused() {
        assert!(matches!(
            expand_name("x-{{timestamp}}"),
            Err(RenderError::TemplateDelimiters(_))
        ));
    }

    #[test]
    fn bake_values_only_appear_as_variables() {
        let t = ebs_template();
        let (b, id) = (bake(), identity());
        let input = input_with(&t, &b, &id, ResolvedSource::AmiId("ami-0123456789abcdef0".into()));
        let v = render(&input).unwrap();
        assert_eq!(v["variables"]["service"], "simple-service");
        let builders = v["builders"].to_string();
        assert!(
            !builders.contains("simple-service"),
            "service spliced into builder: {builders}"
        );
        let prov = v["provisioners"].to_string();
        assert!(
            !prov.contains("simple-service"),
            "service spliced into provisioner: {prov}"
        );
        assert!(prov.contains("BAKE_SERVICE={{user `service`}}"));
    }

    #[test]
    fn baker_tags_override_template_tags_and_carry_the_uid() {
        let mut t = ebs_template();
        t.tags.insert(keys::BAKE_UID.into(), "forged".into());
        let (b, id) = (bake(), identity());
        let input = input_with(&t, &b, &id, ResolvedSource::AmiId("ami-0123456789abcdef0".into()));
        let v = render(&input).unwrap();
        for key in ["tags", "snapshot_tags", "run_tags", "run_volume_tags"] {
            assert_eq!(
                v["builders"][0][key][keys::BAKE_UID],
                "{{user `bake_uid`}}",
                "{key}"
            );
            assert_eq!(v["builders"][0][key]["team"], "platform", "{key}");
        }
        assert_eq!(v["builders"][0]["tags"][keys::SOURCE_AMI], "{{ .SourceAMI }}");
    }

    #[test]
    fn operator_endpoint_applies_unless_template_overrides_it() {
        let t = ebs_template();
        let (b, id) = (bake(), identity());
        let mut input = RenderInput {
            bake: &b,
            identity: &id,
            template_name: "ebs-example",
            template: &t,
            source: ResolvedSource::AmiId("ami-0123456789abcdef0".into()),
            default_ec2_endpoint: Some("http://127.0.0.1:5000"),
            bake_key: "",
        };
        let v = render(&input).unwrap();
        assert_eq!(v["builders"][0]["custom_endpoint_ec2"], "http://127.0.0.1:5000");
        let mut overriding = t.clone();
        overriding.ec2_endpoint = Some("http://127.0.0.1:6000".into());
        input.template = &overriding;
        let v = render(&input).unwrap();
        assert_eq!(v["builders"][0]["custom_endpoint_ec2"], "http://127.0.0.1:6000");
    }

    #[test]
    fn provisioners_with_communicator_none_are_refused() {
        let mut t = ebs_template();
        t.communicator = Some(Communicator::None);
        let (b, id) = (bake(), identity());
        let input = input_with(&t, &b, &id, ResolvedSource::AmiId("ami-0123456789abcdef0".into()));
        assert_eq!(
            render(&input).unwrap_err(),
            RenderError::ProvisionersWithoutCommunicator
        );
    }

    #[test]
    fn unresolved_filter_renders_source_ami_filter_with_virtualization_type() {
        let mut t = ebs_template();
        t.source = SourceImage {
            ami_id: None,
            filter: Some(ImageFilter {
                owners: vec!["amazon".into()],
                name: Some("amzn2-ami-{virtualizationType}-*".into()),
                tags: BTreeMap::new(),
            }),
            catalog: None,
        };
        let (b, id) = (bake(), identity());
        let input = input_with(
            &t,
            &b,
            &id,
            ResolvedSource::Filter(t.source.filter.clone().unwrap_or_default()),
        );
        let v = render(&input).unwrap();
        let f = &v["builders"][0]["source_ami_filter"];
        assert_eq!(f["filters"]["name"], "amzn2-ami-hvm-*");
        assert_eq!(f["most_recent"], true);
        assert!(v["builders"][0].get("source_ami").is_none());
    }
}
