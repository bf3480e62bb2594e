# One agent task as a Nomad batch job on the docker driver: `cvm run` in a microVM with the
# project cloned into the task's directory; the command's exit status is the task's.
#
# Needs, on each client: /dev/kvm (hardware KVM), docker, and deploy/seccomp.json copied to
# /etc/cvm/seccomp.json (docker's default profile refuses user namespaces). The image is the
# one scripts/build-oci builds, pushed to your registry.
job "cvm-agent-task" {
  type = "batch"

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  group "task" {
    count = 1

    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "clone" {
      driver = "docker"

      lifecycle {
        hook = "prestart"
      }

      config {
        image      = "registry.example.com/cvm:0.1.0"
        entrypoint = ["git"]
        args       = ["clone", "--depth=1", "https://github.com/example/project.git", "/alloc/data/project"]
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }

    task "cvm" {
      driver = "docker"

      config {
        image        = "registry.example.com/cvm:0.1.0"
        # /dev/kvm as a device (a bind mount of it is refused with EPERM), cvm's seccomp
        # profile, and the container's root: no added capability, not privileged.
        devices = [
          {
            host_path      = "/dev/kvm"
            container_path = "/dev/kvm"
          }
        ]
        security_opt = ["seccomp=/etc/cvm/seccomp.json"]
        work_dir     = "/alloc/data/project"
        args         = ["run", "--timeout", "1h", "--memory", "2G", "--cpus", "2", ".", "--", "make", "test"]
      }

      user = "root"

      kill_signal  = "SIGTERM"
      kill_timeout = "45s"

      resources {
        cpu    = 4000
        memory = 3072
      }
    }
  }
}
