"""Engine servers: launch profiles (one table), and launchers (subprocess, docker, external URL)."""
