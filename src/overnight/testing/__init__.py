"""Test helpers shipped with overnight: a faithful fake of the OpenAI and Anthropic APIs.

`fake_provider` (FakeProvider, Knobs, Stats; also a CLI) serves them over real HTTP;
`fake_answers`, `fake_openai`, `fake_anthropic` and `fake_state` are its parts. Nothing is
imported here, so `overnight.testing` costs nothing until a fake is wanted.
"""
