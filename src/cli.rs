//! The `baker` command line: `run` (the operator), `crd` (print or write the CRDs) and
//! `template render` (the Packer template a Bake would get, without a cluster).

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use kube::ResourceExt;

use crate::api::{self, Bake, BakeTemplate};
use crate::config::OperatorConfig;
use crate::packer::{self, BakeIdentity, RenderInput, ResolvedSource};

#[derive(Parser, Debug)]
#[command(
    name = "baker",
    version,
    about = "Bakes Amazon Machine Images with Packer, as a Kubernetes operator"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run {
        #[command(flatten)]
        config: OperatorConfig,
        #[command(flatten)]
        serve: crate::operator::ServeConfig,
        /// Log format: `json` for log pipelines, `text` for people.
        #[arg(long, env = "BAKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
        log_format: LogFormat,
    },
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Work with Packer templates.
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Print the Packer template a Bake would get (the old service's dry run).
    Render {
        /// A file with the BakeTemplate manifest.
        #[arg(long)]
        template: PathBuf,
        /// A file with the Bake manifest.
        #[arg(long)]
        bake: PathBuf,
        /// Use this source AMI instead of the template's source (as the operator resolves it).
        /// Without it, a filter source is left for Packer to resolve.
        #[arg(long)]
        source_ami: Option<String>,
        /// EC2 endpoint to render when the template names none (as the operator would).
        #[arg(long, env = "AWS_ENDPOINT_URL_EC2")]
        ec2_endpoint: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Errors a person at the command line sees.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid {kind} manifest: {source}")]
    Parse {
        path: PathBuf,
        kind: &'static str,
        source: serde_yaml::Error,
    },
    #[error("the Bake names template {bake:?}, but the file holds BakeTemplate {file:?}")]
    TemplateMismatch { bake: String, file: String },
    #[error("the BakeTemplate sets none of source.amiId, source.filter or source.catalog")]
    NoSource,
    #[error("the BakeTemplate takes its source image from AmiCatalog {0:?}: pass --source-ami")]
    CatalogSource(String),
    #[error(transparent)]
    Render(#[from] packer::RenderError),
    #[error("serialising CRDs failed: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    KubeClient(#[from] crate::operator::ClientError),
    #[error(transparent)]
    Operator(#[from] crate::operator::OperatorError),
}

fn read_manifest<T: serde::de::DeserializeOwned>(path: &Path, kind: &'static str) -> Result<T, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.into(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| CliError::Parse {
        path: path.into(),
        kind,
        source,
    })
}

/// The bake image assumed by a dry run; it only enters the bake key.
const DRY_RUN_IMAGE: &str = crate::config::DEFAULT_PACKER_IMAGE;

/// Renders the Packer template for a Bake and a BakeTemplate read from files.
pub fn render_from_files(
    template_path: &Path,
    bake_path: &Path,
    source_ami: Option<String>,
    ec2_endpoint: Option<&str>,
) -> Result<String, CliError> {
    let template: BakeTemplate = read_manifest(template_path, "BakeTemplate")?;
    let bake: Bake = read_manifest(bake_path, "Bake")?;
    if bake.spec.template != template.name_any() {
        return Err(CliError::TemplateMismatch {
            bake: bake.spec.template.clone(),
            file: template.name_any(),
        });
    }
    let source = match (
        source_ami,
        &template.spec.source.ami_id,
        &template.spec.source.filter,
    ) {
        (Some(id), _, _) => ResolvedSource::AmiId(id),
        (None, Some(id), _) => ResolvedSource::AmiId(id.clone()),
        (None, None, Some(filter)) => ResolvedSource::Filter(filter.clone()),
        (None, None, None) => {
            return Err(match &template.spec.source.catalog {
                Some(c) => CliError::CatalogSource(c.name.clone()),
                None => CliError::NoSource,
            });
        }
    };
    let identity = BakeIdentity {
        name: bake.name_any(),
        namespace: bake.namespace().unwrap_or_else(|| "default".into()),
        // A dry run has no Bake UID yet; the operator fills in the real one.
        uid: bake
            .uid()
            .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into()),
    };
    let input = RenderInput {
        bake: &bake.spec,
        identity: &identity,
        template_name: &bake.spec.template,
        template: &template.spec,
        source,
        default_ec2_endpoint: ec2_endpoint,
        bake_key: "",
    };
    Ok(crate::bake::key::render_keyed(&input, DRY_RUN_IMAGE)?.rendered)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn,aws=warn"));
    // Colours only for a person at a terminal: never escape codes in a file or a log pipeline.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    // A second initialisation (tests) is harmless; ignore it.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs a parsed command line.
pub async fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Crd { dir: None } => {
            print!("{}", api::crds_yaml()?);
            Ok(())
        }
        Command::Crd { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).map_err(|source| CliError::Write {
                path: dir.clone(),
                source,
            })?;
            for crd in api::crds() {
                let path = dir.join(api::crd_file_name(&crd));
                let text = serde_yaml::to_string(&crd)?;
                std::fs::write(&path, text).map_err(|source| CliError::Write { path, source })?;
            }
            Ok(())
        }
        Command::Template(TemplateCommand::Render {
            template,
            bake,
            source_ami,
            ec2_endpoint,
        }) => {
            print!(
                "{}",
                render_from_files(&template, &bake, source_ami, ec2_endpoint.as_deref())?
            );
            Ok(())
        }
        Command::Run {
            config,
            serve,
            log_format,
        } => {
            init_tracing(log_format);
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let client = crate::operator::client(metrics.clone()).await?;
            let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            tracing::info!(
                packer_image = %config.packer_image,
                credentials_secret = config.aws_credentials_secret.is_some(),
                ec2_endpoint = config.ec2_endpoint.as_deref().unwrap_or("default"),
                "starting the Bake and AmiCatalog controllers"
            );
            Ok(crate::operator::run(client, aws, metrics, config, serve).await?)
        }
    }
}
