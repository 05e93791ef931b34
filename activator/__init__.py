"""Scale-from-zero interception: the local gateway and the Kubernetes interceptor."""
