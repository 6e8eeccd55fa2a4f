"""Unit: bench.jvm_threads finds the busiest window of a sample and splits it by thread."""

from __future__ import annotations

import json

from bench.jvm_threads import busiest, java_thread_names, thread_group


def test_the_busiest_window_and_its_compiler_share(tmp_path):
    cpu = {"kafka:C2 CompilerThre": 0.0, "kafka:data-plane-kafk": 0.0}
    lines = []
    for second in range(10):
        if 3 <= second < 6:  # 3 busy seconds: 1 s of compiling, 0.5 s of requests each
            cpu = {
                "kafka:C2 CompilerThre": cpu["kafka:C2 CompilerThre"] + 1.0,
                "kafka:data-plane-kafk": cpu["kafka:data-plane-kafk"] + 0.5,
            }
        lines.append(json.dumps({"t": 1000.0 + second, "s": dict(cpu)}))
    sample = tmp_path / "jvm.jsonl"
    sample.write_text("\n".join(lines) + "\n")
    report = busiest(sample, 3)
    assert "4.5 CPU s of JVM threads, 3.0 of them in JIT compiler threads" in report[0]
    assert report[1].split() == ["3.00", "kafka:C2", "CompilerThre"]


def test_a_sample_shorter_than_the_window_says_so(tmp_path):
    sample = tmp_path / "jvm.jsonl"
    sample.write_text(json.dumps({"t": 1.0, "s": {}}) + "\n")
    assert busiest(sample, 18) == [f"no window of 18 s in {sample}"]


def test_thread_names_come_from_the_thread_dump_by_nid():
    dump = (
        '"main" #1 prio=5 os_prio=0 cpu=1355.75ms elapsed=11.07s tid=0x00007fb5a4018ce0 nid=0x3c3e waiting\n'
        "   java.lang.Thread.State: WAITING\n"
        '"opensearch[diana-1][write][T#2]" #61 daemon prio=5 os_prio=0 cpu=8.1ms tid=0x00007f nid=0x3d40 waiting\n'
    )
    assert java_thread_names(dump) == {0x3C3E: "main", 0x3D40: "opensearch[diana-1][write][T#2]"}
    # JDK 18 and later print the nid in decimal.
    assert java_thread_names('"main" #1 prio=5 os_prio=0 cpu=1.2ms tid=0x00007f nid=15422 waiting\n') == {15422: "main"}


def test_threads_of_one_kind_share_a_group_whatever_their_node_or_number():
    assert thread_group("opensearch[diana-1][write][T#1]") == thread_group("opensearch[node-2][write][T#4]")
    assert thread_group("opensearch[diana-1][write][T#1]") == "opensearch[][write][T]"
    assert thread_group("data-plane-kafka-request-handler-7") == "data-plane-kafka-request-handler"
    assert thread_group("C2 CompilerThread0") == "C2 CompilerThread"
