//! Authenticated peers that misbehave: a worker of the job, with a valid
//! certificate, tries to replace signed initial weights, to make the
//! scheduler hold ever more state, to connect twice under one identity, or
//! to speak on a connection the scheduler never registered. Each is refused
//! by a real scheduler and server (in this process, on ports 31700-31799)
//! while the legitimate worker carries on.

use std::time::Duration;

use warden_agent::net::conn::{ClientConn, ConnError};
use warden_agent::net::identity::Role;
use warden_agent::net::wire::Message;
use warden_tests::{RoleCluster, assert_already_connected, bind_at, scratch};

/// The next message other than a heartbeat, within 10 s.
async fn next(c: &mut ClientConn) -> Result<Message, ConnError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await.expect("an answer within 10 s") {
            Ok(Message::Heartbeat) => continue,
            other => return other,
        }
    }
}

/// The refusal `c` receives next.
async fn refusal(c: &mut ClientConn) -> String {
    match next(c).await {
        Err(ConnError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A job whose `[model] init` names signed weights: worker 0's `set_params`
/// is refused with a reason, and the server still holds the signed values.
#[tokio::test]
async fn signed_initial_weights_cannot_be_replaced_by_a_worker() {
    let dir = scratch("insiders-init");
    let (private, public) = warden_agent::store::signing::write_key_pair(&dir.join("keys"), None).unwrap();
    let model = warden_agent::job::spec::ModelSpec::mlp(4, Vec::new(), 2);
    let n = warden_agent::train::model::num_params(&model);
    let signed: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
    let weights = dir.join("weights");
    warden_agent::store::artifact::write_model(&weights, &model, &signed, 1).unwrap();
    let key = warden_agent::store::signing::load_private_key(&private, None).unwrap();
    warden_agent::store::signing::sign_model(&weights, &key, None).unwrap();
    let init = format!("classes = 2\ninit = \"{}\"\ntrusted_keys = [\"{}\"]", weights.display(), public.display());
    let cluster = RoleCluster::start_on(bind_at(31700), "", &[("classes = 2", &init)]).await;

    let mut w = cluster.worker_conn().await;
    w.send(&Message::SetParams { data: vec![9.0; n] }).await.unwrap();
    let why = refusal(&mut w).await;
    assert!(why.contains("signed weights of [model] init"), "{why}");
    let mut w = cluster.worker_conn().await;
    w.send(&Message::Pull { min_version: 0 }).await.unwrap();
    match next(&mut w).await.unwrap() {
        Message::Params { version, data } => assert_eq!((version, data), (0, signed)),
        m => panic!("expected params, got `{}`", m.name()),
    }
}

/// Barrier ids only go forward: one that was released already is refused
/// (a scheduler keeping every id it was sent would grow without bound).
#[tokio::test]
async fn a_barrier_id_that_does_not_move_forward_is_refused() {
    let mut cluster = RoleCluster::start_on(bind_at(31702), "", &[]).await;
    let w = &mut cluster.worker_sched;
    w.send(&Message::Barrier { id: 5 }).await.unwrap();
    assert_eq!(next(w).await.unwrap(), Message::BarrierDone { id: 5 });
    for old in [5, 3] {
        w.send(&Message::Barrier { id: old }).await.unwrap();
        let why = refusal(w).await;
        assert!(why.contains("barrier 5 was released already"), "{why}");
    }
    w.send(&Message::Barrier { id: 6 }).await.unwrap();
    assert_eq!(next(w).await.unwrap(), Message::BarrierDone { id: 6 });
}

/// Worker 0 asks the scheduler for checkpoints of later and later steps
/// without ever letting them complete: past the bound on checkpoints in
/// flight it is refused, and a step that does not move forward is too.
#[tokio::test]
async fn worker_0_cannot_keep_ever_more_checkpoints_in_flight() {
    let mut cluster = RoleCluster::start_on(bind_at(31704), "", &[]).await;
    let w = &mut cluster.worker_sched;
    w.send(&Message::Checkpoint { step: 1 }).await.unwrap();
    w.send(&Message::Checkpoint { step: 1 }).await.unwrap();
    let why = refusal(w).await;
    assert!(why.contains("step 1 came before it"), "{why}");
    let bound = warden_agent::train::roles::scheduler::CHECKPOINTS_IN_FLIGHT as u64;
    for step in 2..=bound + 1 {
        w.send(&Message::Checkpoint { step }).await.unwrap();
    }
    let why = refusal(w).await;
    assert!(why.contains(&format!("{bound} checkpoints are in flight already")), "{why}");
}

/// A second connection under an identity that is connected already is
/// refused before its welcome, at the scheduler and at a server; the first
/// connection carries on.
#[tokio::test]
async fn a_second_connection_under_a_connected_identity_is_refused() {
    let mut cluster = RoleCluster::start_on(bind_at(31706), "", &[]).await;
    assert_already_connected("the scheduler", cluster.try_conn(Role::Worker, 0, Role::Scheduler).await);
    let mut first = cluster.worker_conn().await;
    assert_already_connected("the server", cluster.try_conn(Role::Worker, 0, Role::Server).await);
    warden_tests::honest_sgd_step(&mut first, 0).await;
    let w = &mut cluster.worker_sched;
    w.send(&Message::Barrier { id: 1 }).await.unwrap();
    assert_eq!(next(w).await.unwrap(), Message::BarrierDone { id: 1 });
}

/// A worker certificate of a rank the plan does not have is turned away at
/// registration; what it sends afterwards on that connection is ignored. (A
/// `finished` counted from it would end the job for the real worker.)
#[tokio::test]
async fn an_unregistered_connection_cannot_speak_for_the_job() {
    let mut cluster = RoleCluster::start_on(bind_at(31708), "", &[]).await;
    let mut rogue = cluster.try_conn(Role::Worker, 7, Role::Scheduler).await.unwrap();
    rogue.send(&Message::Register).await.unwrap();
    let why = refusal(&mut rogue).await;
    assert!(why.contains("already started"), "{why}");
    rogue.send(&Message::Finished).await.unwrap();
    rogue.send(&Message::Barrier { id: 1 }).await.unwrap();
    let w = &mut cluster.worker_sched;
    w.send(&Message::Barrier { id: 1 }).await.unwrap();
    assert_eq!(next(w).await.unwrap(), Message::BarrierDone { id: 1 });
}
