// Command streaming_client drives a CRI streaming server with the same client code that
// kubectl and crictl use (k8s.io/client-go), for the clearcri streaming tests.
//
//	streaming_client exec -url URL [-ws] [-stdin] [-tty] [-no-stderr] [-sizes 80x24,100x40]
//	streaming_client exec-loop [-ws]            (one URL per stdin line; prints "code seconds")
//	streaming_client portforward -url URL [-ws] -remote PORT  (prints "READY <local port>")
//
// exec copies its stdin/stdout/stderr to the remote streams and exits with the remote
// exit code (or 100 plus a message on stderr for any other error).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	utilexec "k8s.io/client-go/util/exec"
)

// sizeQueue hands out a fixed list of terminal sizes, one per interval.
type sizeQueue struct {
	sizes    []remotecommand.TerminalSize
	interval time.Duration
	next     int
}

func (q *sizeQueue) Next() *remotecommand.TerminalSize {
	if q.next >= len(q.sizes) {
		select {} // no more resizes: block for the rest of the session
	}
	if q.next > 0 {
		time.Sleep(q.interval)
	}
	size := q.sizes[q.next]
	q.next++
	return &size
}

func parseSizes(text string) ([]remotecommand.TerminalSize, error) {
	var sizes []remotecommand.TerminalSize
	for _, item := range strings.Split(text, ",") {
		if item == "" {
			continue
		}
		w, h, ok := strings.Cut(item, "x")
		if !ok {
			return nil, fmt.Errorf("bad size %q (want COLSxROWS)", item)
		}
		cols, err1 := strconv.Atoi(w)
		rows, err2 := strconv.Atoi(h)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad size %q", item)
		}
		sizes = append(sizes, remotecommand.TerminalSize{Width: uint16(cols), Height: uint16(rows)})
	}
	return sizes, nil
}

func executor(rawURL string, ws bool) (remotecommand.Executor, error) {
	config := &rest.Config{}
	if ws {
		return remotecommand.NewWebSocketExecutor(config, "GET", rawURL)
	}
	parsed, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	return remotecommand.NewSPDYExecutor(config, "POST", parsed)
}

// runExec returns the remote exit code, or an error that is not an exit code.
func runExec(rawURL string, ws bool, opts remotecommand.StreamOptions) (int, error) {
	exec, err := executor(rawURL, ws)
	if err != nil {
		return 0, err
	}
	err = exec.StreamWithContext(context.Background(), opts)
	if err == nil {
		return 0, nil
	}
	var exitErr utilexec.CodeExitError
	if errors.As(err, &exitErr) {
		return exitErr.Code, nil
	}
	return 0, err
}

func cmdExec(args []string) int {
	fs := flag.NewFlagSet("exec", flag.ExitOnError)
	rawURL := fs.String("url", "", "exec or attach URL")
	ws := fs.Bool("ws", false, "use WebSocket (v5.channel.k8s.io) instead of SPDY")
	stdin := fs.Bool("stdin", false, "send this program's stdin")
	tty := fs.Bool("tty", false, "remote terminal")
	noStdout := fs.Bool("no-stdout", false, "do not ask for stdout")
	noStderr := fs.Bool("no-stderr", false, "do not ask for stderr")
	sizes := fs.String("sizes", "", "terminal sizes to send, COLSxROWS,...")
	interval := fs.Duration("size-interval", 300*time.Millisecond, "time between sizes")
	_ = fs.Parse(args)
	opts := remotecommand.StreamOptions{Tty: *tty}
	if *stdin {
		opts.Stdin = os.Stdin
	}
	if !*noStdout {
		opts.Stdout = os.Stdout
	}
	if !*noStderr && !*tty {
		opts.Stderr = os.Stderr
	}
	if *sizes != "" {
		list, err := parseSizes(*sizes)
		if err != nil {
			fmt.Fprintln(os.Stderr, "streaming_client:", err)
			return 100
		}
		opts.TerminalSizeQueue = &sizeQueue{sizes: list, interval: *interval}
	}
	code, err := runExec(*rawURL, *ws, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "streaming_client: error:", err)
		return 100
	}
	return code
}

func cmdExecLoop(args []string) int {
	fs := flag.NewFlagSet("exec-loop", flag.ExitOnError)
	ws := fs.Bool("ws", false, "use WebSocket")
	_ = fs.Parse(args)
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		rawURL := strings.TrimSpace(lines.Text())
		if rawURL == "" {
			continue
		}
		start := time.Now()
		code, err := runExec(rawURL, *ws, remotecommand.StreamOptions{Stdout: io.Discard, Stderr: io.Discard})
		elapsed := time.Since(start).Seconds()
		if err != nil {
			fmt.Printf("error %.6f %v\n", elapsed, err)
		} else {
			fmt.Printf("%d %.6f\n", code, elapsed)
		}
	}
	return 0
}

func cmdPortForward(args []string) int {
	fs := flag.NewFlagSet("portforward", flag.ExitOnError)
	rawURL := fs.String("url", "", "port-forward URL")
	ws := fs.Bool("ws", false, "tunnel SPDY in WebSocket")
	remote := fs.Int("remote", 0, "port in the pod")
	_ = fs.Parse(args)
	parsed, err := url.Parse(*rawURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "streaming_client:", err)
		return 100
	}
	config := &rest.Config{}
	transport, upgrader, err := spdy.RoundTripperFor(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "streaming_client:", err)
		return 100
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, "POST", parsed)
	if *ws {
		dialer, err = portforward.NewSPDYOverWebsocketDialer(parsed, config)
		if err != nil {
			fmt.Fprintln(os.Stderr, "streaming_client:", err)
			return 100
		}
	}
	stop := make(chan struct{})
	ready := make(chan struct{})
	// Stop when stdin closes, so the test controls the lifetime.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"},
		[]string{fmt.Sprintf("0:%d", *remote)}, stop, ready, os.Stderr, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "streaming_client:", err)
		return 100
	}
	go func() {
		<-ready
		ports, err := fw.GetPorts()
		if err != nil || len(ports) == 0 {
			fmt.Fprintln(os.Stderr, "streaming_client: no ports:", err)
			os.Exit(100)
		}
		fmt.Printf("READY %d\n", ports[0].Local)
	}()
	if err := fw.ForwardPorts(); err != nil {
		fmt.Fprintln(os.Stderr, "streaming_client: error:", err)
		return 100
	}
	return 0
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: streaming_client exec|exec-loop|portforward [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "exec":
		os.Exit(cmdExec(os.Args[2:]))
	case "exec-loop":
		os.Exit(cmdExecLoop(os.Args[2:]))
	case "portforward":
		os.Exit(cmdPortForward(os.Args[2:]))
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
