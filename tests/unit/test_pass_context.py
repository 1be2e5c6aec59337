"""The context of a pass: what it asks to run follows its spec, however often it is asked."""

from __future__ import annotations

from controller.runtimes import base
from controller.spec import loader, models
from controller.spec.keys import PluginKey
from controller.swap import context

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {name: echo}
spec: {image: "example/echo:1", version: 1.0.0, config: {level: 1}}
"""


def test_what_a_pass_wants_follows_a_spec_it_replaced() -> None:
    plugin = loader.load_text(SPEC)[0].plugin
    ctx = context.PassContext(
        key=PluginKey("echo"),
        plugin=plugin,
        spec=plugin.spec,
        generation=1,
        declared_hash="",
        observed=[],
        old=models.PluginStatus(),
        status=models.PluginStatus(),
        memory=context.Memory(),
        now=0.0,
        controller_id="c",
        color=models.Color.BLUE,
    )
    first = ctx.want_for(models.Color.BLUE).spec_hash
    assert first == base.instance_hash(plugin.spec) == ctx.want_for(models.Color.GREEN).spec_hash
    ctx.spec = plugin.spec.model_copy(update={"config": {"level": 2}})  # as undo pins one
    again = ctx.want_for(models.Color.BLUE).spec_hash
    assert again == base.instance_hash(ctx.spec) != first
    replica = ctx.of_replica(1).want_for(models.Color.BLUE)
    assert replica.spec_hash == again
    assert replica.labels[base.LABEL_REPLICA] == "1"
