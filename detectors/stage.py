"""Entries of the detect stages. The AVA detection heads arrive with their own issue; until then the
stages exist in the graph (so manifests and `status` can name them) and say so when run."""

from pipeline.errors import ConfigError

_NOT_YET = "the {} stage is not built yet: AVA-style detection arrives with its own issue"


def extract_keyframes(ctx):
    raise ConfigError(_NOT_YET.format(ctx.name))


def train(ctx):
    raise ConfigError(_NOT_YET.format(ctx.name))


def evaluate(ctx):
    raise ConfigError(_NOT_YET.format(ctx.name))
