"""The example app used by the README, the demo and the tests."""
