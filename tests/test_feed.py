"""The feed follower behaves like `tail -F`: appends, rotation, truncation, partial lines, restart from a position."""
from __future__ import annotations

import os

from agent.feed import FeedFollower, FeedPosition


def lines(follower, final=False):
    return [(l.lineno, l.line) for l in follower.read(final=final)]


def test_reads_lines_with_offsets_and_picks_up_appends(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("a\nbb\n")
    f = FeedFollower(FeedPosition(str(feed)))
    got = list(f.read())
    assert [(l.lineno, l.offset, l.line) for l in got] == [(1, 2, "a"), (2, 5, "bb")]
    assert lines(f) == []
    with feed.open("a") as fh:
        fh.write("ccc\n")
    assert lines(f) == [(3, "ccc")]
    assert f.position.offset == feed.stat().st_size


def test_partial_line_waits_for_its_newline(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("a\npart")
    f = FeedFollower(FeedPosition(str(feed)))
    assert lines(f) == [(1, "a")]
    with feed.open("a") as fh:
        fh.write("ial\n")
    assert lines(f) == [(2, "partial")]


def test_final_read_takes_an_unterminated_last_line(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("a\nlast")
    assert lines(FeedFollower(FeedPosition(str(feed))), final=True) == [(1, "a"), (2, "last")]


def test_restart_resumes_exactly_at_the_stored_position(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("one\ntwo\nthree\n")
    first = FeedFollower(FeedPosition(str(feed)))
    it = first.read()
    next(it)
    next(it)
    saved = first.position
    first.close()
    again = FeedFollower(saved)
    assert lines(again) == [(3, "three")]


def test_rotation_drains_the_old_file_then_follows_the_new_one(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("old1\n")
    f = FeedFollower(FeedPosition(str(feed)))
    assert lines(f) == [(1, "old1")]
    with feed.open("a") as fh:
        fh.write("old2\n")
    os.rename(feed, tmp_path / "feed.jsonl.1")
    feed.write_text("new1\nnew2\n")
    assert lines(f) == [(2, "old2"), (1, "new1"), (2, "new2")]
    assert f.position.inode == feed.stat().st_ino


def test_rotation_while_stopped_reads_the_new_file_from_the_start(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("old1\nold2\n")
    f = FeedFollower(FeedPosition(str(feed)))
    lines(f)
    saved = f.position
    f.close()
    os.rename(feed, tmp_path / "feed.jsonl.1")
    feed.write_text("new1\n")
    assert lines(FeedFollower(saved)) == [(1, "new1")]


def test_truncation_rereads_from_the_start(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("first line\nsecond line\n")
    f = FeedFollower(FeedPosition(str(feed)))
    lines(f)
    with feed.open("r+") as fh:
        fh.truncate(0)
        fh.write("x\n")
    assert lines(f) == [(1, "x")]


def test_overlong_and_non_utf8_lines_are_reported_not_loaded(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"ok\n" + b"y" * 100 + b"\n\xff\xfe\nafter\n")
    got = list(FeedFollower(FeedPosition(str(feed)), max_line_bytes=32).read())
    assert [(l.lineno, l.line) for l in got] == [(1, "ok"), (2, ""), (3, ""), (4, "after")]
    assert "longer than 32 bytes" in got[1].error
    assert "UTF-8" in got[2].error


def test_missing_file_yields_nothing_until_it_appears(tmp_path):
    feed = tmp_path / "later.jsonl"
    f = FeedFollower(FeedPosition(str(feed)))
    assert lines(f) == []
    feed.write_text("hello\n")
    assert lines(f) == [(1, "hello")]
