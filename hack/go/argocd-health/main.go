// Command argocd-health runs Argo CD health checks written in Lua (resource customizations
// for argocd-cm) the way Argo CD's application controller runs them, so that Fleetward's
// checks can be tested against fixtures and against live objects without an Argo CD.
//
// Usage:
//
//	argocd-health test DIR         run every health_test.yaml under DIR (Argo CD's layout:
//	                               <group>/<kind>/health.lua, health_test.yaml, testdata/);
//	                               prints one line per case, exits 1 on any mismatch
//	argocd-health eval HEALTH.lua  read one object (YAML or JSON) on stdin and print
//	                               {"status": ..., "message": ...} as JSON; exits 1 when the
//	                               script failed (the printed status is then Unknown, with
//	                               the error as message, which is what Argo CD shows)
//
// The environment is Argo CD's for a custom health check from argocd-cm (without
// useOpenLibs), rebuilt here from its documented behaviour rather than copied:
//   - a fresh Lua state with no standard library, then only the package, base and table
//     libraries: no string and no math library, so string.format, ("x"):find or math.max
//     fail here as they fail in Argo CD;
//   - Argo CD also opens a reduced os library (time, date, clock). It is left out here on
//     purpose: Fleetward's checks need no clock, and an environment that is a strict subset
//     of Argo CD's means a check that passes here runs there;
//   - the object is the global `obj` (JSON numbers become Lua numbers, arrays 1-based
//     tables, objects tables keyed by string, null nil);
//   - the script runs under a 1 s deadline and must return a table, which is read as JSON
//     {status, message}; a status that is not one of Argo CD's health codes becomes Unknown
//     with the message "Lua returned an invalid health status".
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

// scriptTimeout is the deadline Argo CD gives one health script.
const scriptTimeout = time.Second

// invalidStatus is Argo CD's message for a status it does not know; kept verbatim so that
// tests and live checks see what the Argo CD UI would show.
const invalidStatus = "Lua returned an invalid health status"

// validStatuses are Argo CD's health codes (gitops-engine's HealthStatusCode).
var validStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

// Health is what a health script reports, as Argo CD stores it.
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// testFile is Argo CD's health_test.yaml format.
type testFile struct {
	Tests []struct {
		HealthStatus Health `json:"healthStatus"`
		InputPath    string `json:"inputPath"`
	} `json:"tests"`
}

func main() {
	if len(os.Args) != 3 {
		usage()
	}
	switch os.Args[1] {
	case "test":
		os.Exit(runTests(os.Args[2]))
	case "eval":
		os.Exit(runEval(os.Args[2], os.Stdin))
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: argocd-health test DIR | argocd-health eval HEALTH.lua < object.yaml")
	os.Exit(2)
}

// evaluate runs one health script against one object as Argo CD does.
func evaluate(script string, object any) (Health, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		l.Push(l.NewFunction(lib.open))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, object))
	if err := l.DoString(script); err != nil {
		return Health{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return Health{}, fmt.Errorf("the health script returned a %s; Argo CD needs a table {status, message}", l.Get(-1).Type())
	}
	value, err := fromLua(table)
	if err != nil {
		return Health{}, err
	}
	// Through JSON, as Argo CD reads it: a status or message that is not a string is an error.
	encoded, err := json.Marshal(value)
	if err != nil {
		return Health{}, err
	}
	var health Health
	if err := json.Unmarshal(encoded, &health); err != nil {
		return Health{}, fmt.Errorf("the returned table is not {status, message} (%s): %w", encoded, err)
	}
	if !validStatuses[health.Status] {
		return Health{Status: "Unknown", Message: invalidStatus}, nil
	}
	return health, nil
}

// toLua converts a decoded JSON value (numbers as json.Number) to a Lua value.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		f, err := v.Float64()
		if err != nil { // out of float64 range: JSON allows it, Kubernetes objects never hold one
			return lua.LString(v.String())
		}
		return lua.LNumber(f)
	case []any:
		table := l.NewTable()
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]any:
		table := l.NewTable()
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	default:
		panic(fmt.Sprintf("unexpected JSON value %T", value))
	}
}

// fromLua converts a script's result to plain Go values: a table with keys 1..n becomes a
// list, one with string keys an object; anything else cannot be JSON and is an error.
func fromLua(value lua.LValue) (any, error) {
	switch v := value.(type) {
	case *lua.LNilType:
		return nil, nil
	case lua.LBool:
		return bool(v), nil
	case lua.LString:
		return string(v), nil
	case lua.LNumber:
		return float64(v), nil
	case *lua.LTable:
		if n := v.MaxN(); n > 0 {
			list := make([]any, 0, n)
			for i := 1; i <= n; i++ {
				item, err := fromLua(v.RawGetInt(i))
				if err != nil {
					return nil, err
				}
				list = append(list, item)
			}
			return list, nil
		}
		object := map[string]any{}
		var failed error
		v.ForEach(func(key, item lua.LValue) {
			name, ok := key.(lua.LString)
			if !ok {
				failed = errors.Join(failed, fmt.Errorf("a table key of type %s cannot be a JSON object key", key.Type()))
				return
			}
			converted, err := fromLua(item)
			failed = errors.Join(failed, err)
			object[string(name)] = converted
		})
		return object, failed
	default:
		return nil, fmt.Errorf("a Lua %s cannot be converted to JSON", value.Type())
	}
}

// readObject parses one Kubernetes object given as YAML or JSON.
func readObject(data []byte) (map[string]any, error) {
	encoded, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, err
	}
	decoder := json.NewDecoder(bytes.NewReader(encoded))
	decoder.UseNumber()
	var object map[string]any
	if err := decoder.Decode(&object); err != nil {
		return nil, err
	}
	if object == nil {
		return nil, errors.New("no object in the input")
	}
	return object, nil
}

func runEval(scriptPath string, input io.Reader) int {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	data, err := io.ReadAll(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	object, err := readObject(data)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stdin: %v\n", err)
		return 2
	}
	health, err := evaluate(string(script), object)
	code := 0
	if err != nil {
		// What Argo CD shows for a failing script; the exit code tells a caller it failed.
		health = Health{Status: "Unknown", Message: err.Error()}
		fmt.Fprintf(os.Stderr, "%s: %v\n", scriptPath, err)
		code = 1
	}
	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false) // messages hold "<" and ">" (Lua's "<string>" chunk name)
	_ = out.Encode(health)
	return code
}

func runTests(root string) int {
	var files []string
	err := filepath.WalkDir(root, func(path string, entry fs.DirEntry, err error) error {
		if err == nil && !entry.IsDir() && entry.Name() == "health_test.yaml" {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if len(files) == 0 {
		fmt.Fprintf(os.Stderr, "no health_test.yaml under %s\n", root)
		return 2
	}
	sort.Strings(files)
	passed, failed := 0, 0
	for _, file := range files {
		p, f := runTestFile(root, file)
		passed += p
		failed += f
	}
	fmt.Printf("%d case(s) passed, %d failed\n", passed, failed)
	if failed > 0 || passed == 0 {
		return 1
	}
	return 0
}

// runTestFile runs the cases of one health_test.yaml against the health.lua beside it.
func runTestFile(root, file string) (passed, failed int) {
	dir := filepath.Dir(file)
	kind, _ := filepath.Rel(root, dir)
	fail := func(what string, err error) (int, int) {
		fmt.Printf("FAIL %s: %s: %v\n", kind, what, err)
		return passed, failed + 1
	}
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		return fail("health.lua", err)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return fail("health_test.yaml", err)
	}
	var tests testFile
	if err := yaml.UnmarshalStrict(data, &tests); err != nil {
		return fail("health_test.yaml", err)
	}
	if len(tests.Tests) == 0 {
		return fail("health_test.yaml", errors.New("no tests"))
	}
	for _, test := range tests.Tests {
		input, err := os.ReadFile(filepath.Join(dir, test.InputPath))
		if err != nil {
			failed++
			fmt.Printf("FAIL %s %s: %v\n", kind, test.InputPath, err)
			continue
		}
		object, err := readObject(input)
		if err != nil {
			failed++
			fmt.Printf("FAIL %s %s: %v\n", kind, test.InputPath, err)
			continue
		}
		got, err := evaluate(string(script), object)
		switch {
		case err != nil:
			failed++
			fmt.Printf("FAIL %s %s: the script failed: %v\n", kind, test.InputPath, err)
		case got != test.HealthStatus:
			failed++
			fmt.Printf("FAIL %s %s:\n     want %s: %q\n     got  %s: %q\n",
				kind, test.InputPath, test.HealthStatus.Status, test.HealthStatus.Message, got.Status, got.Message)
		default:
			passed++
			fmt.Printf("ok   %s %s: %s: %s\n", kind, test.InputPath, got.Status, got.Message)
		}
	}
	return passed, failed
}
