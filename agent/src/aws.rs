//! What the agent's AWS SDK clients (the S3 backup store, the Route 53
//! traffic driver) share: the SDK configuration, with credentials from
//! the usual chain or a credentials file, and error messages that keep the
//! SDK's source chain (its Display alone says "service error").

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// The SDK configuration for `region`: credentials from the usual AWS
/// chain (the `AWS_*` variables, the shared files, web identity, the
/// instance or task role), or from `credentials_file` (its `[default]`
/// profile) when given.
pub async fn sdk_config(region: &str, credentials_file: Option<&std::path::Path>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned()));
    if let Some(file) = credentials_file {
        use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
        let files = EnvConfigFiles::builder()
            .with_file(EnvConfigFileKind::Credentials, file)
            .build();
        loader = loader.credentials_provider(
            aws_config::profile::ProfileFileCredentialsProvider::builder()
                .profile_files(files)
                .build(),
        );
    }
    loader.load().await
}

/// `what: error: source: source…`. Neither the errors nor their sources
/// carry credentials.
pub fn error_chain(what: &str, e: &dyn std::error::Error) -> String {
    let mut msg = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}
