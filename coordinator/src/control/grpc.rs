//! The control service's gRPC face: each call names its caller, hands the
//! request to the application layer (`ControlApi`'s inherent methods of the
//! same name, which Rust picks before the trait's), and maps its
//! [`ApiError`](super::ApiError) to a status in one place
//! (`From<ApiError> for Status`).
//!
//! Reads are linearizable (see [`ControlApi::linearizable`]), except
//! `GetClusterStatus`, which is this node's own view by design.

use cutover_shared::grpc::caller;
use cutover_shared::proto::control_service_server::ControlService;
use cutover_shared::proto::{self as pb};
use tonic::{Request, Response, Status};

use super::{ControlApi, WatchStream};

#[tonic::async_trait]
impl ControlService for ControlApi {
    type WatchOperationStream = WatchStream;

    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        Ok(Response::new(
            ControlApi::get_cluster_status(self, req.into_inner()).await?,
        ))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::AddNodeResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::add_node(self, &who, req.into_inner()).await?))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::remove_node(self, &who, req.into_inner()).await?,
        ))
    }

    async fn transfer_leadership(
        &self,
        req: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::transfer_leadership(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::list_agents(self, req.into_inner()).await?))
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_status(self, req.into_inner()).await?))
    }

    async fn run_task(&self, req: Request<pb::RunTaskRequest>) -> Result<Response<pb::RunTaskResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::run_task(self, &who, req.into_inner()).await?))
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(
            ControlApi::list_operations(self, req.into_inner()).await?,
        ))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::GetOperationResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_operation(self, req.into_inner()).await?))
    }

    async fn watch_operation(&self, req: Request<pb::WatchOperationRequest>) -> Result<Response<WatchStream>, Status> {
        self.linearizable().await?;
        Ok(Response::new(
            ControlApi::watch_operation(self, req.into_inner()).await?,
        ))
    }

    async fn create_attestation(
        &self,
        req: Request<pb::CreateAttestationRequest>,
    ) -> Result<Response<pb::CreateAttestationResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::create_attestation(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_attestations(
        &self,
        req: Request<pb::ListAttestationsRequest>,
    ) -> Result<Response<pb::ListAttestationsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(
            ControlApi::list_attestations(self, req.into_inner()).await?,
        ))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(
            ControlApi::list_audit_events(self, req.into_inner()).await?,
        ))
    }

    async fn apply_app(&self, req: Request<pb::ApplyAppRequest>) -> Result<Response<pb::ApplyAppResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::apply_app(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_apps(&self, req: Request<pb::ListAppsRequest>) -> Result<Response<pb::ListAppsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::list_apps(self, req.into_inner()).await?))
    }

    async fn get_app(&self, req: Request<pb::GetAppRequest>) -> Result<Response<pb::GetAppResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_app(self, req.into_inner()).await?))
    }

    async fn deploy(&self, req: Request<pb::DeployRequest>) -> Result<Response<pb::DeployResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::deploy(self, &who, req.into_inner()).await?))
    }

    async fn switch(&self, req: Request<pb::SwitchRequest>) -> Result<Response<pb::SwitchResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::switch(self, &who, req.into_inner()).await?))
    }

    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::rollback(self, &who, req.into_inner()).await?))
    }

    async fn health_check(
        &self,
        req: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::health_check(self, &who, req.into_inner()).await?,
        ))
    }

    async fn run_analysis(
        &self,
        req: Request<pb::RunAnalysisRequest>,
    ) -> Result<Response<pb::RunAnalysisResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::run_analysis(self, &who, req.into_inner()).await?,
        ))
    }

    async fn promote_operation(
        &self,
        req: Request<pb::PromoteOperationRequest>,
    ) -> Result<Response<pb::PromoteOperationResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::promote_operation(self, &who, req.into_inner()).await?,
        ))
    }

    async fn pause_operation(
        &self,
        req: Request<pb::PauseOperationRequest>,
    ) -> Result<Response<pb::PauseOperationResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::pause_operation(self, &who, req.into_inner()).await?,
        ))
    }

    async fn resume_operation(
        &self,
        req: Request<pb::ResumeOperationRequest>,
    ) -> Result<Response<pb::ResumeOperationResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::resume_operation(self, &who, req.into_inner()).await?,
        ))
    }

    async fn abort_operation(
        &self,
        req: Request<pb::AbortOperationRequest>,
    ) -> Result<Response<pb::AbortOperationResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::abort_operation(self, &who, req.into_inner()).await?,
        ))
    }

    async fn create_release(
        &self,
        req: Request<pb::CreateReleaseRequest>,
    ) -> Result<Response<pb::CreateReleaseResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::create_release(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_releases(
        &self,
        req: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::list_releases(self, req.into_inner()).await?))
    }

    async fn get_release(
        &self,
        req: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::GetReleaseResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_release(self, req.into_inner()).await?))
    }

    async fn migrate(&self, req: Request<pb::MigrateRequest>) -> Result<Response<pb::MigrateResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::migrate(self, &who, req.into_inner()).await?))
    }

    async fn create_backup(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::create_backup(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_backups(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::list_backups(self, req.into_inner()).await?))
    }

    async fn failover(&self, req: Request<pb::FailoverRequest>) -> Result<Response<pb::FailoverResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::failover(self, &who, req.into_inner()).await?))
    }

    async fn rejoin(&self, req: Request<pb::RejoinRequest>) -> Result<Response<pb::RejoinResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::rejoin(self, &who, req.into_inner()).await?))
    }

    async fn drill(&self, req: Request<pb::DrillRequest>) -> Result<Response<pb::DrillResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(ControlApi::drill(self, &who, req.into_inner()).await?))
    }

    async fn list_drills(
        &self,
        req: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::list_drills(self, req.into_inner()).await?))
    }

    async fn set_drill_schedule(
        &self,
        req: Request<pb::SetDrillScheduleRequest>,
    ) -> Result<Response<pb::SetDrillScheduleResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::set_drill_schedule(self, &who, req.into_inner()).await?,
        ))
    }

    async fn delete_drill_schedule(
        &self,
        req: Request<pb::DeleteDrillScheduleRequest>,
    ) -> Result<Response<pb::DeleteDrillScheduleResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::delete_drill_schedule(self, &who, req.into_inner()).await?,
        ))
    }

    async fn get_dr_status(
        &self,
        req: Request<pb::GetDrStatusRequest>,
    ) -> Result<Response<pb::GetDrStatusResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_dr_status(self, req.into_inner()).await?))
    }

    async fn plan_failover(
        &self,
        req: Request<pb::PlanFailoverRequest>,
    ) -> Result<Response<pb::PlanFailoverResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::plan_failover(self, req.into_inner()).await?))
    }

    async fn get_backup(&self, req: Request<pb::GetBackupRequest>) -> Result<Response<pb::GetBackupResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(ControlApi::get_backup(self, req.into_inner()).await?))
    }

    async fn validate_backup(
        &self,
        req: Request<pb::ValidateBackupRequest>,
    ) -> Result<Response<pb::ValidateBackupResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::validate_backup(self, &who, req.into_inner()).await?,
        ))
    }

    async fn restore_backup(
        &self,
        req: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::restore_backup(self, &who, req.into_inner()).await?,
        ))
    }

    async fn delete_backup(
        &self,
        req: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::delete_backup(self, &who, req.into_inner()).await?,
        ))
    }

    async fn set_backup_schedule(
        &self,
        req: Request<pb::SetBackupScheduleRequest>,
    ) -> Result<Response<pb::SetBackupScheduleResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::set_backup_schedule(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_backup_schedules(
        &self,
        req: Request<pb::ListBackupSchedulesRequest>,
    ) -> Result<Response<pb::ListBackupSchedulesResponse>, Status> {
        self.linearizable().await?;
        Ok(Response::new(
            ControlApi::list_backup_schedules(self, req.into_inner()).await?,
        ))
    }

    async fn delete_backup_schedule(
        &self,
        req: Request<pb::DeleteBackupScheduleRequest>,
    ) -> Result<Response<pb::DeleteBackupScheduleResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            ControlApi::delete_backup_schedule(self, &who, req.into_inner()).await?,
        ))
    }
}
