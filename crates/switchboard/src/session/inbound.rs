//! A client frame, whatever carried it (a WebSocket message, a POSTed body's element): decoded,
//! counted against the session's [`Guards`], handled by its [`Core`], answered through its
//! transport.

use switchboard_protocol::{ErrorCode, ServerFrame};

use super::Exit;
use super::core::{Core, Transport};

/// Handles one client frame's payload in the session's codec.
pub(super) async fn receive<T: Transport>(transport: &mut T, payload: &[u8]) -> Result<(), Exit> {
    let node = transport.core().node.clone();
    let metrics = node.metrics();
    metrics.bytes_in.inc_by(payload.len() as u64);
    // A deflate session's frames reach here unpacked: JSON.
    let frame = match transport
        .core()
        .handle
        .codec
        .content()
        .decode_client(payload)
    {
        Ok(frame) => frame,
        Err(error) => {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return bad_frame(transport, error.id, error.code, error.message).await;
        }
    };
    metrics.frames_in.with_label_values(&[frame.kind()]).inc();
    if over_rate(transport, "data")? {
        let error = ServerFrame::error(
            frame.id(),
            ErrorCode::RateLimited,
            "too many frames: slow down",
        );
        return transport.write_frames(vec![error]).await;
    }
    let frames = Core::handle(transport, frame).await?;
    if frames.is_empty() {
        Ok(())
    } else {
        transport.write_frames(frames).await
    }
}

/// Counts one frame against the rate limit: `Ok(true)` when it is over the limit and must be
/// refused, `Err` (close with 1008) once the client keeps going over it.
pub(super) fn over_rate<T: Transport>(transport: &mut T, kind: &'static str) -> Result<bool, Exit> {
    let node = transport.core().node.clone();
    transport
        .guards()
        .over_rate(node.config(), node.metrics(), kind)
        .map_err(Exit::Close)
}

/// Answers an undecodable frame, closing with 1008 once a client keeps sending them.
pub(super) async fn bad_frame<T: Transport>(
    transport: &mut T,
    id: Option<u64>,
    code: ErrorCode,
    message: String,
) -> Result<(), Exit> {
    let node = transport.core().node.clone();
    transport
        .guards()
        .bad_frame(node.config())
        .map_err(Exit::Close)?;
    transport
        .write_frames(vec![ServerFrame::error(id, code, message)])
        .await
}
