//! The gRPC adapter for workers: authenticates, converts wire messages to and from the domain's
//! [`ToWorker`]/[`FromWorker`], and delegates to [`Master`]. Nothing else knows the wire format.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiln_proto as pb;
use kiln_proto::master_message::Body as Out;
use kiln_proto::worker_message::Body as In;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::master::Master;
use crate::remote::{
    Command, FromWorker, StatInfo, Stream as OutputStream, ToWorker, Update, WorkerInfo, WorkerSession,
};
use crate::workers::AttachError;

/// How a worker proves it may connect.
#[derive(Debug)]
pub enum Admission {
    /// A bearer token from this list; a token admits any worker name.
    Tokens(Vec<String>),
    /// A client certificate, verified by the TLS layer against `workers.tls.client_ca`; it admits
    /// only the worker names it carries as DNS names.
    Certificates,
}

/// The `WorkerService` implementation.
pub struct WorkerGrpc {
    master: Arc<Master>,
    admission: Arc<Admission>,
}

impl WorkerGrpc {
    pub fn new(master: Arc<Master>, admission: Admission) -> Self {
        Self { master, admission: Arc::new(admission) }
    }

    pub fn into_server(self) -> pb::worker_service_server::WorkerServiceServer<WorkerGrpc> {
        pb::worker_service_server::WorkerServiceServer::new(self)
    }
}

fn authenticate(tokens: &[String], metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    let header = metadata
        .get(kiln_proto::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("missing worker token"))?;
    let token = header.strip_prefix("Bearer ").unwrap_or(header);
    if crate::secrets::matches_any(tokens, token) {
        Ok(())
    } else {
        Err(Status::unauthenticated("invalid worker token"))
    }
}

/// Checks that a worker's certificate carries the name it registers under.
fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> Result<(), Status> {
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| Status::unauthenticated("the client certificate cannot be read"))?;
    let subject = ServerName::try_from(name).map_err(|_| {
        Status::permission_denied(format!("the worker name {name:?} is not a DNS name, so no certificate can carry it"))
    })?;
    cert.verify_is_valid_for_subject_name(&subject)
        .map_err(|_| Status::permission_denied(format!("the client certificate does not name the worker {name:?}")))
}

fn attach_status(error: AttachError) -> Status {
    match error {
        AttachError::NameTaken(_) => Status::already_exists(error.to_string()),
        AttachError::Invalid(_) => Status::invalid_argument(error.to_string()),
        AttachError::ShuttingDown => Status::unavailable(error.to_string()),
        AttachError::Store(inner) => {
            warn!(error = %inner, "could not register a worker");
            Status::unavailable("the master cannot reach its database")
        }
    }
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<pb::MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerGrpc {
    type SessionStream = OutboundStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<OutboundStream>, Status> {
        let certificate = match &*self.admission {
            Admission::Tokens(tokens) => {
                authenticate(tokens, request.metadata())?;
                None
            }
            Admission::Certificates => Some(
                request
                    .peer_certs()
                    .and_then(|chain| chain.first().cloned())
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?,
            ),
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration within 10 s"))??;
        let Some(pb::WorkerMessage { body: Some(In::Register(register)) }) = first else {
            return Err(Status::invalid_argument("the first message must be Register"));
        };
        if let Some(certificate) = &certificate {
            certificate_names(certificate, &register.name)?;
        }
        let info = worker_info(register);
        let (tx, rx) = mpsc::channel::<ToWorker>(64);
        let session = self.master.workers.attach(info, tx).await.map_err(attach_status)?;

        let master = Arc::clone(&self.master);
        let reader_session = Arc::clone(&session);
        tokio::spawn(async move {
            read_worker(&master, &reader_session, inbound).await;
            master.workers.detach(&reader_session).await;
        });
        let heartbeat_session = Arc::clone(&session);
        let interval = self.master.heartbeat;
        tokio::spawn(async move {
            let mut sequence = 0u64;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = heartbeat_session.closed() => return,
                }
                sequence += 1;
                if heartbeat_session.send(ToWorker::Heartbeat(sequence)).await.is_err() {
                    return;
                }
            }
        });
        let ended = Arc::clone(&session);
        let outbound =
            ReceiverStream::new(rx).map(|message| Ok(encode(message))).take_until(async move { ended.closed().await });
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Reads the worker's messages until it leaves, goes silent for three heartbeats, or the session
/// is closed from this side.
async fn read_worker(master: &Arc<Master>, session: &Arc<WorkerSession>, mut inbound: Streaming<pb::WorkerMessage>) {
    let silence = master.heartbeat * 3;
    loop {
        let message = tokio::select! {
            message = tokio::time::timeout(silence, inbound.message()) => message,
            _ = session.closed() => return,
        };
        match message {
            Ok(Ok(Some(message))) => match decode(message) {
                Some(message) => master.workers.message(session, message).await,
                None => warn!(worker = session.name(), "ignoring an empty or misplaced message"),
            },
            Ok(Ok(None)) => {
                info!(worker = session.name(), "worker closed its session");
                return;
            }
            // A draining worker that exits may drop the connection rather than close the stream:
            // that is how it leaves, not a protocol error worth a reader's attention.
            Ok(Err(status)) if session.is_draining() && session.running_builds() == 0 => {
                info!(worker = session.name(), "drained worker left");
                debug!(worker = session.name(), %status, "how the drained worker's connection ended");
                return;
            }
            Ok(Err(status)) => {
                warn!(worker = session.name(), %status, "worker session failed");
                return;
            }
            Err(_) => {
                warn!(worker = session.name(), seconds = silence.as_secs_f64(), "worker silent too long; session lost");
                return;
            }
        }
    }
}

/// What a worker says of itself when it registers.
fn worker_info(register: pb::Register) -> WorkerInfo {
    WorkerInfo {
        name: register.name,
        version: register.version,
        max_builds: register.max_builds.max(1),
        labels: register.labels.into_iter().collect(),
        commands: register.commands,
        basedir: register.basedir,
        host: register.host,
        pool: Some(register.pool).filter(|p| !p.is_empty()),
        details: serde_json::Map::new(),
    }
}

/// What the master makes of one encoded message from a worker: the worker it describes, if it
/// registers, and what it says. For the fuzz target: sessions read messages off the stream.
pub(crate) fn read_message(bytes: &[u8]) -> Option<(Option<WorkerInfo>, Option<FromWorker>)> {
    use prost::Message;
    let message = pb::WorkerMessage::decode(bytes).ok()?;
    let info = match message.body.clone() {
        Some(In::Register(register)) => Some(worker_info(register)),
        _ => None,
    };
    Some((info, decode(message)))
}

fn decode(message: pb::WorkerMessage) -> Option<FromWorker> {
    Some(match message.body? {
        In::Register(_) => return None,
        In::Heartbeat(_) => FromWorker::Heartbeat,
        In::Draining(_) => FromWorker::Draining,
        In::Complete(c) => {
            FromWorker::Complete { command_id: c.command_id, error: Some(c.error).filter(|e| !e.is_empty()) }
        }
        In::Update(u) => {
            use pb::command_update::Body as U;
            let update = match u.body? {
                U::Output(o) => {
                    let stream = match pb::OutputStream::try_from(o.stream).unwrap_or(pb::OutputStream::Unspecified) {
                        pb::OutputStream::Stderr => OutputStream::Stderr,
                        pb::OutputStream::Header => OutputStream::Header,
                        _ => OutputStream::Stdout,
                    };
                    Update::Output(stream, o.data)
                }
                U::Rc(rc) => Update::Rc(rc),
                U::Elapsed(e) => Update::Elapsed(e),
                U::Files(f) => Update::Files(f.paths),
                U::Stat(s) => Update::Stat(StatInfo {
                    exists: s.exists,
                    is_dir: s.is_dir,
                    size: s.size,
                    mode: s.mode,
                    mtime: s.mtime,
                }),
                U::Property(p) => {
                    Update::Property(p.name, serde_json::from_str(&p.value_json).unwrap_or(serde_json::Value::Null))
                }
                U::FileData(d) => Update::FileData(d),
                U::FailureReason(r) => Update::FailureReason(r),
            };
            FromWorker::Update { command_id: u.command_id, update }
        }
    })
}

fn encode(message: ToWorker) -> pb::MasterMessage {
    let body = match message {
        ToWorker::Registered { workerid, master_name, heartbeat_interval_ms } => {
            Out::Registered(pb::Registered { worker_id: workerid, master_name, heartbeat_interval_ms })
        }
        ToWorker::Heartbeat(sequence) => Out::Heartbeat(pb::Heartbeat { sequence }),
        ToWorker::Start { command_id, builder_name, buildid, command } => Out::Start(pb::StartCommand {
            command_id,
            builder_name,
            build_id: buildid,
            command: Some(encode_command(command)),
        }),
        ToWorker::FileChunk { command_id, data, last } => Out::FileChunk(pb::FileChunk { command_id, data, last }),
        ToWorker::Interrupt { command_id, reason } => Out::Interrupt(pb::Interrupt { command_id, reason }),
        ToWorker::Drain => Out::Drain(pb::Drain {}),
        ToWorker::Shutdown { reason } => Out::Shutdown(pb::Shutdown { reason }),
    };
    pb::MasterMessage { body: Some(body) }
}

fn encode_command(command: Command) -> pb::start_command::Command {
    use pb::start_command::Command as C;
    match command {
        Command::Shell(s) => C::Shell(pb::ShellCommand {
            argv: s.argv,
            script: s.script.unwrap_or_default(),
            workdir: s.workdir,
            env: s.env.into_iter().collect(),
            unset_env: Vec::new(),
            timeout_secs: s.timeout_secs,
            max_time_secs: s.max_time_secs,
            log_environ: s.log_environ,
        }),
        Command::Git(g) => C::Git(pb::GitCommand {
            repourl: g.repourl,
            revision: g.revision.unwrap_or_default(),
            branch: g.branch.unwrap_or_default(),
            workdir: g.workdir,
            mode: g.mode,
            timeout_secs: g.timeout_secs,
        }),
        Command::Mkdir { paths } => C::Mkdir(pb::PathsCommand { paths }),
        Command::Rmdir { paths } => C::Rmdir(pb::PathsCommand { paths }),
        Command::Stat { path } => C::Stat(pb::PathCommand { path }),
        Command::Glob { path } => C::Glob(pb::PathCommand { path }),
        Command::Listdir { path } => C::Listdir(pb::PathCommand { path }),
        Command::UploadFile { path, max_size } => C::UploadFile(pb::UploadFile { path, max_size }),
        Command::DownloadFile { path, mode, .. } => C::DownloadFile(pb::DownloadFile { path, mode }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_exactly() {
        let tokens = vec!["s3cret".to_owned()];
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert!(authenticate(&tokens, &metadata).is_err());
        metadata.insert("authorization", "Bearer s3cre".parse().unwrap());
        assert!(authenticate(&tokens, &metadata).is_err());
        metadata.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(authenticate(&tokens, &metadata).is_ok());
    }
}
