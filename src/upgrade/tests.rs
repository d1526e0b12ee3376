use super::*;

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("upgrade.sock")
}

#[test]
fn frames_are_laid_out_as_documented() {
    // Pinned: a successor of a later build reads these bytes.
    assert_eq!(
        session_frame("c1", b"ST").unwrap(),
        [0, 0, 0, 7, KIND_SESSION, 0, 2, b'c', b'1', b'S', b'T']
    );
    assert_eq!(frame(KIND_BEGIN, &[]), [0, 0, 0, 1, 1]);
    assert_eq!(frame(KIND_CLOSE, &[]), [0, 0, 0, 1, 5]);
    assert_eq!(frame(KIND_EVENT, &[3, 1, 9]), [0, 0, 0, 4, 4, 3, 1, 9]);
    assert_eq!(
        frame(KIND_END, &3u64.to_be_bytes()),
        [0, 0, 0, 9, 3, 0, 0, 0, 0, 0, 0, 0, 3]
    );
}

#[tokio::test]
async fn without_a_running_adapter_the_socket_is_served_fresh_even_over_a_stale_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    // A socket file whose process is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let start = start(&path, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(start, Start::Fresh(_)));
}

/// A predecessor that offers one TCP listener and two sessions, speaking
/// `ours`; returns what the successor (speaking `theirs`) made of it.
async fn hand_over(
    ours: RangeInclusive<u16>,
    theirs: RangeInclusive<u16>,
) -> (Result<Start, UpgradeError>, Option<u16>) {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let Start::Fresh(listener) = start(&path, Duration::from_secs(5)).await.unwrap() else {
        panic!("nobody held the socket")
    };
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let running = tokio::spawn(async move {
        let s = accept_with(&listener, ours).await.unwrap()?;
        let mut offered = Offered::default();
        offered.add(Role::Handler, tcp.as_fd()).unwrap();
        offered.add(Role::Upgrade, listener.as_fd()).unwrap();
        s.offer(&offered).await.unwrap();
        let sessions: Vec<(Arc<str>, Vec<u8>)> =
            vec![("a".into(), b"state-a".to_vec()), ("b".into(), Vec::new())];
        let format = s.format;
        let (relay, done) = s.into_relay();
        relay.event(3, MAY_REORDER, b"before").await.unwrap();
        relay.sessions(&sessions).await.unwrap();
        relay.event(5, 0, b"after").await.unwrap();
        relay.close().await.unwrap();
        done.wait().await.unwrap();
        Some(format)
    });
    let started = start_with(&path, Duration::from_secs(5), theirs).await;
    if let Ok(Start::Successor(i)) = &started {
        assert_eq!(
            i.handler.as_ref().unwrap().local_addr().unwrap(),
            tcp_addr,
            "the very listening socket passed"
        );
        assert!(i.upgrade.is_some());
    }
    let started = match started {
        Ok(Start::Successor(mut i)) => {
            let link = &mut i.link;
            assert_eq!(
                link.next().await.unwrap(),
                Frame::Event {
                    rpc: 3,
                    flags: MAY_REORDER,
                    body: b"before".to_vec()
                }
            );
            link.served().await.unwrap();
            assert_eq!(link.next().await.unwrap(), Frame::Begin);
            assert_eq!(
                link.next().await.unwrap(),
                Frame::Session("a".into(), b"state-a".to_vec())
            );
            assert_eq!(
                link.next().await.unwrap(),
                Frame::Session("b".into(), Vec::new())
            );
            assert_eq!(link.next().await.unwrap(), Frame::End(2));
            assert_eq!(
                link.next().await.unwrap(),
                Frame::Event {
                    rpc: 5,
                    flags: 0,
                    body: b"after".to_vec()
                }
            );
            link.served().await.unwrap();
            assert_eq!(link.next().await.unwrap(), Frame::Close);
            let Inherited { link, .. } = *i;
            link.done().await.unwrap();
            Ok(Start::Fresh(
                UnixListener::bind(dir.path().join("x")).unwrap(),
            ))
        }
        other => other,
    };
    (started, running.await.unwrap())
}

#[tokio::test]
async fn a_successor_gets_the_sockets_and_every_session() {
    let (started, format) = hand_over(1..=1, 1..=1).await;
    started.unwrap();
    assert_eq!(format, Some(1));
}

#[tokio::test]
async fn a_newer_build_takes_over_in_the_older_format() {
    // Build N speaks 1; build N+1 reads 1 and 2: they agree on 1.
    let (started, format) = hand_over(1..=1, 1..=2).await;
    started.unwrap();
    assert_eq!(format, Some(1));
    // And the other way round: N+1 hands over to N in format 1.
    let (started, format) = hand_over(1..=2, 1..=1).await;
    started.unwrap();
    assert_eq!(format, Some(1));
}

#[tokio::test]
async fn no_common_format_is_refused_and_the_running_adapter_goes_on() {
    let (started, format) = hand_over(1..=1, 2..=3).await;
    match started {
        Err(UpgradeError::Incompatible { theirs, ours, .. }) => {
            assert_eq!(theirs, "1");
            assert_eq!(ours, "2..3");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(format, None, "the running adapter handed nothing over");
}
