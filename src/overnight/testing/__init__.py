"""Test helpers shipped with overnight: a faithful fake of the providers (fake_provider)."""
