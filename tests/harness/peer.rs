//! [`Peer`]: a raw WebSocket session that keeps its own request ids, matches each answer to its
//! request and keeps every other frame in arrival order, so tests can check whole sequences of
//! what a session receives (a duplicate would show up before the next expected frame). Every
//! wait is one [`RawClient::next_frame`], so each frame must come within [`crate::DEADLINE`].

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use switchboard_protocol::{
    ClientFrame, Codec, ErrorFrame, InboxState, Member, Reply, RoomMessage, Sender, ServerFrame,
    StreamPosition,
};

use crate::client::{publish_frame, user_url};
use crate::{NodeProcess, RawClient};

/// A raw WebSocket session (JSON) that answers requests by id and keeps every other frame, in
/// arrival order, for [`Peer::next`].
pub struct Peer {
    pub raw: RawClient,
    pub session: String,
    pub user: String,
    /// The user's inbox as the `welcome` said.
    pub inbox: InboxState,
    pending: VecDeque<ServerFrame>,
    next_id: u64,
}

impl Peer {
    /// Connects to `node` as `user` with JSON and waits for the `welcome`, which must name `user`
    /// and the node's id.
    pub async fn connect(node: &NodeProcess, user: &str) -> Result<Peer> {
        let (raw, welcome) = RawClient::connect(&user_url(node, user), Codec::Json).await?;
        let ServerFrame::Welcome {
            session,
            user: welcomed,
            node: node_id,
            inbox,
            ..
        } = welcome
        else {
            bail!("not a welcome: {welcome:?}");
        };
        ensure!(welcomed == user, "welcomed as {welcomed}, expected {user}");
        ensure!(
            node_id == node.node_id,
            "welcomed by {node_id}, expected {}",
            node.node_id
        );
        Ok(Peer {
            raw,
            session,
            user: user.to_owned(),
            inbox,
            pending: VecDeque::new(),
            next_id: 0,
        })
    }

    /// A fresh request id.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn sender(&self) -> Sender {
        Sender {
            user: self.user.clone(),
            session: self.session.clone(),
        }
    }

    pub fn member(&self) -> (String, String) {
        (self.user.clone(), self.session.clone())
    }

    /// Sends a request and waits for its `reply` or `error`; other frames are kept.
    pub async fn ask(&mut self, frame: ClientFrame) -> Result<Result<Reply, ErrorFrame>> {
        let id = frame.id().context("a request needs an id")?;
        self.raw.send_frame(&frame).await?;
        loop {
            match self.raw.next_frame().await? {
                ServerFrame::Reply(reply) if reply.id == id => return Ok(Ok(reply)),
                ServerFrame::Error(error) if error.id == Some(id) => return Ok(Err(error)),
                other => self.pending.push_back(other),
            }
        }
    }

    /// [`Peer::ask`], whose answer must be a `reply`.
    pub async fn request(&mut self, frame: ClientFrame) -> Result<Reply> {
        let kind = frame.kind();
        self.ask(frame).await?.map_err(|error| {
            anyhow!(
                "{}'s {kind} failed: {} {}",
                self.user,
                error.code,
                error.message
            )
        })
    }

    pub async fn subscribe_with(
        &mut self,
        room: &str,
        since: Option<StreamPosition>,
        presence_events: bool,
    ) -> Result<Reply> {
        let id = self.id();
        self.request(ClientFrame::Subscribe {
            room: room.to_owned(),
            id: Some(id),
            since,
            presence_events,
        })
        .await
    }

    /// Subscribes; returns the room's position.
    pub async fn subscribe(&mut self, room: &str) -> Result<StreamPosition> {
        let reply = self.subscribe_with(room, None, false).await?;
        ensure!(reply.room.as_deref() == Some(room), "reply for {reply:?}");
        ensure!(
            reply.recovered.is_none(),
            "recovered without since: {reply:?}"
        );
        Ok(StreamPosition {
            offset: reply.offset.context("subscribe reply without offset")?,
            epoch: reply.epoch.context("subscribe reply without epoch")?,
        })
    }

    pub async fn unsubscribe(&mut self, room: &str) -> Result<()> {
        let id = self.id();
        self.request(ClientFrame::Unsubscribe {
            room: room.to_owned(),
            id: Some(id),
        })
        .await
        .map(drop)
    }

    pub fn publish_frame(&mut self, room: &str, data: Value) -> ClientFrame {
        publish_frame(room, data, self.id())
    }

    /// Publishes; returns the message's offset.
    pub async fn publish(&mut self, room: &str, data: Value) -> Result<u64> {
        let frame = self.publish_frame(room, data);
        let reply = self.request(frame).await?;
        reply.offset.context("publish reply without offset")
    }

    /// Sends to a user; returns how many sessions the server says it reached.
    pub async fn send(&mut self, to: &str, data: Value) -> Result<u64> {
        let id = self.id();
        let reply = self
            .request(ClientFrame::Send {
                to: to.to_owned(),
                data,
                id: Some(id),
                persist: false,
                key: None,
            })
            .await?;
        reply.sessions.context("send reply without sessions")
    }

    pub async fn presence(&mut self, room: &str) -> Result<BTreeSet<(String, String)>> {
        let id = self.id();
        let reply = self
            .request(ClientFrame::Presence {
                room: room.to_owned(),
                id,
            })
            .await?;
        Ok(pairs(
            &reply.members.context("presence reply without members")?,
        ))
    }

    /// The next frame that is not an answer to a request.
    pub async fn next(&mut self) -> Result<ServerFrame> {
        match self.pending.pop_front() {
            Some(frame) => Ok(frame),
            None => self
                .raw
                .next_frame()
                .await
                .with_context(|| format!("{} waiting for a frame", self.user)),
        }
    }

    pub async fn take(&mut self, count: usize) -> Result<Vec<ServerFrame>> {
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            frames.push(self.next().await?);
        }
        Ok(frames)
    }

    /// The next frame that is not an answer to a request, which must be a room message.
    pub async fn message(&mut self) -> Result<Arc<RoomMessage>> {
        match self.next().await? {
            ServerFrame::Message(message) => Ok(message),
            other => bail!("{} expected a room message, got {other:?}", self.user),
        }
    }

    /// The next `count` frames, which must all be room messages.
    pub async fn messages(&mut self, count: usize) -> Result<Vec<Arc<RoomMessage>>> {
        let mut messages = Vec::with_capacity(count);
        for _ in 0..count {
            let frame = self.next().await.with_context(|| {
                format!(
                    "{} expected {count} room messages, got {:?}",
                    self.user,
                    offsets_and_data(&messages)
                )
            })?;
            match frame {
                ServerFrame::Message(message) => messages.push(message),
                other => bail!("{} expected a room message, got {other:?}", self.user),
            }
        }
        Ok(messages)
    }

    /// Asserts that nothing is waiting for this session: a ping round trip is the barrier (the
    /// server writes everything already queued for a session before it reads the next frame).
    pub async fn quiet(&mut self) -> Result<()> {
        if let Some(frame) = self.pending.front() {
            bail!("{} should have received nothing, got {frame:?}", self.user);
        }
        let id = self.id();
        self.raw
            .send_frame(&ClientFrame::Ping { id: Some(id) })
            .await?;
        match self.raw.next_frame().await? {
            ServerFrame::Pong { id: Some(pong) } if pong == id => Ok(()),
            other => bail!("{} should have received nothing, got {other:?}", self.user),
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> Result<()> {
        self.raw.socket.close(None).await?;
        Ok(())
    }
}

/// The (user, session) pairs of a member list.
pub fn pairs(members: &[Member]) -> BTreeSet<(String, String)> {
    members
        .iter()
        .map(|member| (member.user.clone(), member.session.clone()))
        .collect()
}

/// (offset, data) of each message, for comparing sequences.
pub fn offsets_and_data(messages: &[Arc<RoomMessage>]) -> Vec<(u64, Value)> {
    messages
        .iter()
        .map(|message| (message.offset, message.data.clone()))
        .collect()
}
