"""Test helpers shared across suites: a loopback sshd, libvirt test-driver cells."""
