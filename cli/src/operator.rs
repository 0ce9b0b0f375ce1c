//! `reflow operator`: the Kubernetes operator that runs `MCPInstance`s, and its CRD.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::Failure;

#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(subcommand)]
    command: OperatorCommand,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Print the MCPInstance CustomResourceDefinition (YAML), generated from the operator's types.
    Crd,
    /// Run the operator: reconcile MCPInstances into pods (several replicas elect one leader).
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// A kubeconfig file; default: the in-cluster service account, or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace; default: every namespace.
    #[arg(long, env = "REFLOW_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// The namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "reflow")]
    lease_namespace: String,
    /// This replica's identity in the Lease; default: the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_seconds: u64,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "REFLOW_OPERATOR_LISTEN", default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,
    /// Verify a pod through its Service instead of at its pod IP.
    #[arg(long)]
    verify_via_service: bool,
}

pub async fn run(args: OperatorArgs) -> Result<(), Failure> {
    match args.command {
        OperatorCommand::Crd => {
            print!("{}", reflow_operator::crd::crd_yaml());
            Ok(())
        }
        OperatorCommand::Run(args) => {
            let _logging = crate::init_logging(&Default::default())?;
            let identity = args
                .identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("reflow-operator-{}", std::process::id()));
            let config = reflow_operator::OperatorConfig {
                kubeconfig: args.kubeconfig,
                namespace: args.namespace,
                lease_namespace: args.lease_namespace,
                identity,
                lease_seconds: args.lease_seconds,
                listen: args.listen,
                verify_by_pod_ip: !args.verify_via_service,
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            {
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    crate::shutdown_signal().await;
                    shutdown.cancel();
                });
            }
            reflow_operator::run(config, shutdown).await.map_err(Failure::Other)
        }
    }
}
