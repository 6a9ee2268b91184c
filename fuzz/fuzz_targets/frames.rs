//! Every decoder of bytes from the network: the hello, frame headers and every message type.
//! None may panic, and none may accept a frame over its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_proto::*;

fuzz_target!(|data: &[u8]| {
    if data.len() >= HELLO_LEN {
        let hello: [u8; HELLO_LEN] = data[..HELLO_LEN].try_into().unwrap();
        if let Ok(h) = Hello::decode(&hello) {
            let _ = Hello::OURS.negotiate(&h);
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
    }
    if data.len() >= FRAME_HEADER_LEN {
        let header: [u8; FRAME_HEADER_LEN] = data[..FRAME_HEADER_LEN].try_into().unwrap();
        if let Ok(len) = frame_len(header, MAX_REQUEST_FRAME) {
            assert!(len <= MAX_REQUEST_FRAME);
        }
    }
    // Whole payloads of each type; a message that decodes must survive a round trip. (bincode
    // accepts non-minimal integer encodings, so the bytes need not be identical; nothing hashes
    // wire bytes, digests use their own canonical encoding.)
    if let Ok(m) = decode::<ManagerMsg>(data) {
        let frame = encode_frame(&m, usize::MAX).unwrap();
        assert_eq!(decode::<ManagerMsg>(&frame[FRAME_HEADER_LEN..]).unwrap(), m);
    }
    if let Ok(m) = decode::<AgentMsg>(data) {
        let frame = encode_frame(&m, usize::MAX).unwrap();
        assert_eq!(decode::<AgentMsg>(&frame[FRAME_HEADER_LEN..]).unwrap(), m);
    }
    if let Ok(m) = decode::<FetchRequest>(data) {
        for f in &m.files {
            assert!(!f.path.as_str().split('/').any(|c| c == ".." || c.is_empty()));
        }
    }
    let _ = decode::<FetchReply>(data);
});
